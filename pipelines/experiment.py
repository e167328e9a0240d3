"""The whole experiment as resumable stages: data -> DeepMask -> proposals -> Fast R-CNN per method (and seed) -> sweep.

Each stage writes its outputs under ``runs/<name>/`` and, last, a ``stages/<stage>.done.json`` marker holding its
key. Keys come from one source, :func:`stage_keys`: the config fields that affect the stage (each field's metadata
in core/config.py says which), the keys of the stages it reads, and the image ids of the splits it reads. A stage
whose marker matches is skipped, so a stopped run resumes where it was and a second run of the same config finishes
in seconds. When a stage's key changed, its old outputs are moved aside to ``runs/<name>/stale/<stage>-<old key>/``
(one log line says where), never deleted; only a training whose *resumable* fields changed (``iters``,
``val_every``) keeps its folder and continues from its checkpoint. Inside a stage the library's own checkpoints
(training) and per-image files (proposal stores) resume unfinished work.

Under ``torchrun`` (core/distributed.py) every rank runs this same sequence: rank 0 alone makes the data and writes
the stage markers (the others wait at barriers and take its decisions), and all ranks join each stage, which the
library distributes itself (DDP training, sharded extraction and testing).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path

from core import distributed
from core.config import (DET_TEST, DET_TRAIN, DM_INFER, DM_TRAIN, RANDOM, REPORT, SS, SWEEP, TEST_SPLIT,
                         TRAIN_SPLIT, Config, MaskSource, save_config, section_hash, values_for)
from core.errors import ConfigError
from core.io import read_json, write_json
from proposals import is_imported, known_method

log = logging.getLogger(__name__)

METHOD_TAG = {"deepmask": DM_INFER, "selective_search": SS, "random": RANDOM}
REPORT_VERSION = 1  # of pipelines.report's page and files: a new version rebuilds the report of a finished run
SWEEP_OUTPUTS = ("sweep.json", "sweep.csv", "recall.json", "figure5.png", "recall.png", "recall_iou.png", "results")


@dataclasses.dataclass
class RunPaths:
    root: Path

    @property
    def deepmask(self) -> Path:
        return self.root / "deepmask"

    def store(self, method: str, split: str) -> Path:
        return self.root / "proposals" / f"{method}_{split}"

    def results(self, detector: Path) -> Path:
        """The sweep's test results of the detector in folder `detector` (``results/<its name after detector_>``)."""
        return self.root / "results" / Path(detector).name.removeprefix("detector_")

    def detector(self, method: str, seed: int | None = None, top: int | None = None) -> Path:
        """The detector of `method` trained with `seed` (None: the run's main seed) and, for the re-train protocol,
        the top `top` proposals (None: detector.train_top): ``detector_<method>[_top<N>][_seed<k>]``."""
        return self.root / detector_name(method, seed, top)

    def detectors(self, cfg: Config, method: str) -> list[tuple[int, Path]]:
        """(seed, folder) of every detector of `method` the config trains with ``detector.train_top`` proposals
        (the 'fixed' protocol): the top-level seed's is ``detector_<method>`` (what pipelines.detect --run uses),
        the others ``detector_<method>_seed<k>``."""
        return [(s, self.detector(method, None if s == cfg.seed else s)) for s in cfg.detector_seeds]

    def retrained(self, cfg: Config, method: str) -> list[tuple[int, int, Path]]:
        """(N, seed, folder) of the detectors of the 're-train' protocol (Fast R-CNN §5.5: one detector trained and
        tested with each N of ``sweep.retrain_counts``): ``detector_<method>_top<N>[_seed<k>]``. An N equal to
        ``detector.train_top`` is the fixed protocol's detector itself."""
        return [(n, s, self.detector(method, None if s == cfg.seed else s, None if n == cfg.detector.train_top else n))
                for n in retrain_counts(cfg) for s in cfg.detector_seeds]


def retrain_counts(cfg: Config) -> list[int]:
    return sorted(set(cfg.sweep.retrain_counts))


def split_identity(ds) -> dict:
    """What a stage reading a dataset split depends on: the dataset, the split and the ids it actually holds."""
    ids = "\n".join(str(i) for i in ds.image_ids)
    return {"dataset": ds.name, "split": ds.split, "images": len(ds.image_ids),
            "ids_sha1": hashlib.sha1(ids.encode()).hexdigest()[:16]}


def detector_name(method: str, seed: int | None = None, top: int | None = None) -> str:
    """detector_<method>[_top<N> (re-train protocol)][_seed<k>]: a detector's folder, and its stage's name with
    ``train_`` before it."""
    return f"detector_{method}" + ("" if top is None else f"_top{top}") + ("" if seed is None else f"_seed{seed}")


def detector_stage(method: str, seed: int, cfg: Config, top: int | None = None) -> str:
    """Stage name of the detector of `method`, `seed` and `top` (a top equal to detector.train_top is the fixed
    protocol's detector; the run's main seed is left out of the name)."""
    return "train_" + detector_name(method, None if seed == cfg.seed else seed,
                                    None if top == cfg.detector.train_top else top)


def stage_keys(cfg: Config, train_split: dict, test_split: dict, train_proposals: dict | None = None,
               imported: dict | None = None) -> dict[str, dict]:
    """{stage name: {'key', 'resume_key'}} of every stage of the run, from the config fields' metadata (what each
    affects), the stages each reads, and the identities of the two splits (:func:`split_identity`). Pure: the
    same inputs give the same keys, on any machine. ``resume_key`` (trainings only) leaves out the fields a
    training may resume across. ``train_proposals``: {(method, N or None): fingerprint of the training proposals a
    detector trained with the top N (None: detector.train_top) reads} once they exist
    (:meth:`ProposalStore.fingerprints`); a detector then depends on those boxes rather than on the settings that
    made them, so an inference setting that leaves its top boxes as they were (a
    larger top_n) does not retrain it. ``imported``: {(method, split): the store's meta params (file, sha1,
    conventions)} of the ``imported:<name>`` methods, whose stores pipelines.import_proposals made."""
    keys: dict[str, dict] = {}
    methods = list(cfg.sweep.methods)
    splits = {"train": (cfg.data.train_split, train_split, TRAIN_SPLIT),
              "test": (cfg.data.test_split, test_split, TEST_SPLIT)}
    if "deepmask" in methods:
        keys["train_deepmask"] = {"key": section_hash(values_for(cfg, DM_TRAIN)),
                                  "resume_key": section_hash(values_for(cfg, DM_TRAIN, resumable=False))}
    for method in methods:
        for split, ident, tag in splits.values():
            if is_imported(method):  # no stage makes it: its identity is the imported file's
                keys[f"proposals_{method}_{split}"] = {"key": section_hash(
                    {"method": method, "split": ident, "store": (imported or {}).get((method, split))}),
                    "resume_key": None}
                continue
            deps = {"method": method, "params": values_for(cfg, METHOD_TAG[method]), "split": ident,
                    "split_fields": values_for(cfg, tag)}
            if method == "deepmask":
                deps["deepmask"] = keys["train_deepmask"]["key"]
            keys[f"proposals_{method}_{split}"] = {"key": section_hash(deps), "resume_key": None}
    train = {k: v for k, v in values_for(cfg, DET_TRAIN).items() if k != "seed"}  # the seed is per detector
    fixed = {k: v for k, v in values_for(cfg, DET_TRAIN, resumable=False).items() if k != "seed"}
    for method in methods:
        for top in [None] + retrain_counts(cfg):
            for seed in cfg.detector_seeds:
                name = detector_stage(method, seed, cfg, top)
                if name in keys:
                    continue  # a re-train N equal to detector.train_top: the fixed detector
                props = (train_proposals or {}).get((method, top)) or \
                    keys[f"proposals_{method}_{cfg.data.train_split}"]["key"]
                deps = {"proposals": props, "seed": seed, "split": train_split,
                        "split_fields": values_for(cfg, TRAIN_SPLIT)}
                if top is not None and top != cfg.detector.train_top:
                    deps["train_top"] = top
                keys[name] = {"key": section_hash({**deps, "detector": train}),
                              "resume_key": section_hash({**deps, "detector": fixed})}
    reads = {name: v["key"] for name, v in keys.items()
             if name.startswith("train_detector_") or name.endswith(f"_{cfg.data.test_split}")}
    keys["sweep"] = {"key": section_hash({"sweep": values_for(cfg, SWEEP), "test": values_for(cfg, DET_TEST),
                                          "reads": reads, "split": test_split,
                                          "split_fields": values_for(cfg, TEST_SPLIT)}), "resume_key": None}
    keys["report"] = {"key": section_hash({"sweep": keys["sweep"]["key"], "report": values_for(cfg, REPORT),
                                           "version": REPORT_VERSION}), "resume_key": None}
    return keys


def resolve_data(cfg: Config, progress: bool = True) -> Config:
    """Fill in the dataset paths the synthetic set implies, generating it when missing."""
    cfg = dataclasses.replace(cfg)
    d = cfg.data
    if d.synthetic:
        from core.synthetic import generate

        root = Path(d.synthetic_root or Path(cfg.out_dir) / "data" / f"shapes-{section_hash(_synthetic_params(cfg))}")
        generate(root, trainval=d.synthetic_trainval, test=d.synthetic_test, size=d.synthetic_size,
                 seed=d.synthetic_seed, workers=1, progress=progress)
        d = dataclasses.replace(d, synthetic_root=str(root), voc=d.voc or str(root / "VOC2007"))
        dm = cfg.deepmask
        if not dm.train_sets:
            dm = dataclasses.replace(dm, train_sets=[MaskSource(
                ann=str(root / "annotations" / f"instances_{d.train_split}.json"),
                images=str(root / "VOC2007" / "JPEGImages"))])
        # no val_sets: DeepMask holds out deepmask.val_fraction of its training images for validation, so the
        # detector's test split never influences model selection
        cfg = dataclasses.replace(cfg, data=d, deepmask=dm)
    if not cfg.data.voc:
        raise ConfigError("data.voc: no detection dataset (set data.voc to a VOCdevkit VOC2007 folder, "
                          "or data.synthetic=true)")
    return cfg


def _synthetic_params(cfg: Config) -> dict:
    d = cfg.data
    return {k: getattr(d, k) for k in ("synthetic_trainval", "synthetic_test", "synthetic_size", "synthetic_seed")}


class Stages:
    """Runs named stages once per key; outputs of an older key are moved aside, never deleted."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.timings: dict[str, float] = {}
        self.ran: list[str] = []

    def _marker(self, name: str) -> Path:
        return self.root / "stages" / f"{name}.done.json"

    def is_done(self, name: str, key: str) -> bool:
        m = self._marker(name)
        if not m.is_file():
            return False
        st = read_json(m)
        return st.get("key") == key and st.get("status") == "done"

    def recorded_key(self, name: str) -> str | None:
        """The key stage ``name`` last ran (or started) under, None if it never did."""
        m = self._marker(name)
        return read_json(m).get("key") if m.is_file() else None

    def mark_done(self, name: str, key: str, result, resume_key: str | None = None, seconds: float | None = None):
        st = {"key": key, "resume_key": resume_key, "status": "done", "result": result}
        write_json(self._marker(name), st if seconds is None else {**st, "seconds": round(seconds, 1)}, indent=1)

    def mark_set_aside(self, name: str, key: str) -> None:
        """Record that stage ``name``'s outputs were moved aside under ``key`` (not done: a run rebuilds them)."""
        write_json(self._marker(name), {"key": key, "resume_key": None, "status": "set aside"}, indent=1)

    def move_aside(self, name: str, old_key: str, outputs: list[Path]) -> Path | None:
        """Move the existing `outputs` of stage `name` (made under `old_key`) to ``stale/<name>-<old_key>/``."""
        present = [p for p in outputs if p.exists()]
        if not present:
            return None
        dest = self.root / "stale" / f"{name}-{old_key}"
        k = 1
        while dest.exists():
            dest = self.root / "stale" / f"{name}-{old_key}.{k}"
            k += 1
        dest.mkdir(parents=True)
        for p in present:
            shutil.move(str(p), str(dest / p.name))
        return dest

    def run(self, name: str, key: str, fn, outputs=None, resume_key: str | None = None):
        """Run `fn` unless stage `name` is done for `key`. When the stage last ran (or started) for another key,
        its `outputs` (a path or a list of paths) are moved aside first, so that results of an older config are
        never mixed in nor lost -- except when `resume_key` is the same as then: a training whose resumable fields
        alone changed continues from its checkpoint. A stage interrupted under the same key keeps its outputs,
        and the library resumes from them."""
        marker = self._marker(name)
        outputs = [] if outputs is None else [Path(p) for p in (outputs if isinstance(outputs, (list, tuple))
                                                               else [outputs])]
        main = distributed.is_main()  # torchrun: rank 0 decides and writes the markers, every rank runs fn
        if distributed.broadcast_object(self.is_done(name, key) if main else None):
            log.info("stage %-34s skipped (done for this config)", name)
            return read_json(marker).get("result")
        if main:
            old = read_json(marker) if marker.is_file() else {}
            if old.get("key") not in (None, key):
                if resume_key is not None and old.get("resume_key") == resume_key:
                    log.info("stage %-34s only resumable settings changed: continuing from its checkpoint", name)
                else:
                    dest = self.move_aside(name, old["key"], outputs)
                    if dest is not None:
                        log.info("stage %-34s config changed: its earlier outputs are kept in %s", name, dest)
            write_json(marker, {"key": key, "resume_key": resume_key, "status": "running"})
        distributed.barrier()
        log.info("stage %-34s running", name)
        self.ran.append(name)
        t0 = time.time()
        result = fn()
        dt = time.time() - t0
        self.timings[name] = dt
        if main:
            self.mark_done(name, key, result, resume_key, dt)
        distributed.barrier()
        log.info("stage %-34s done in %.1f s", name, dt)
        return result


def run_experiment(cfg: Config, progress: bool = True) -> dict:
    """Run (or resume) the full experiment; returns the summary dict (also written to summary.json)."""
    from core.datasets import VOCDataset

    distributed.init()
    progress = progress and distributed.is_main()
    cfg = distributed.run_on_main(resolve_data, cfg, progress)  # torchrun: rank 0 makes the data
    paths = RunPaths(cfg.run_dir)
    if distributed.is_main():
        paths.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.root / "config.yaml")
    stages = Stages(paths.root)
    train_ds = VOCDataset(cfg.data.voc, cfg.data.train_split, max_images=cfg.data.train_images)
    test_ds = VOCDataset(cfg.data.voc, cfg.data.test_split, max_images=cfg.data.test_images)
    methods = list(cfg.sweep.methods)
    imported = _imported_params(cfg, paths, methods, (train_ds, test_ds))
    keys = stage_keys(cfg, split_identity(train_ds), split_identity(test_ds), imported=imported)

    # 1. DeepMask
    dm_ckpt = None
    if "deepmask" in methods:
        k = keys["train_deepmask"]
        dm_ckpt = stages.run("train_deepmask", k["key"], lambda: _train_deepmask(cfg, paths.deepmask, progress),
                             outputs=paths.deepmask, resume_key=k["resume_key"])

    # 2. proposals of every method for the detector's train and test splits
    stores: dict[tuple[str, str], str] = {}
    for method in methods:
        for ds in (train_ds, test_ds):
            out = paths.store(method, ds.split)
            if is_imported(method):  # made by pipelines.import_proposals, never recomputed nor moved
                stores[method, ds.split] = str(out)
                continue
            stores[method, ds.split] = stages.run(
                f"proposals_{method}_{ds.split}", keys[f"proposals_{method}_{ds.split}"]["key"],
                lambda m=method, d=ds, o=out: _extract(cfg, m, d, o, dm_ckpt, progress), outputs=out)

    # 3. one Fast R-CNN per method and seed, keyed by the training proposals it reads
    fingerprints = _training_fingerprints(cfg, methods, stores, train_ds)
    keys = stage_keys(cfg, split_identity(train_ds), split_identity(test_ds), fingerprints,
                      imported=imported)
    _train_detectors(cfg, paths, stages, keys, methods, stores, train_ds, progress)

    # 4. the sweep, plots and the summary
    from pipelines.sweep import run_sweep

    stages.run("sweep", keys["sweep"]["key"], lambda: run_sweep(paths.root, cfg=cfg, progress=progress) and
               "sweep.json", outputs=[paths.root / n for n in SWEEP_OUTPUTS])
    # 5. the HTML report
    from pipelines.report import build_report

    stages.run("report", keys["report"]["key"], lambda: str(distributed.run_on_main(
        build_report, paths.root, cfg, progress=progress)), outputs=paths.root / "report")
    summary = read_json(paths.root / "sweep.json")
    summary["stages_run"] = list(stages.ran)
    return summary


def _imported_params(cfg: Config, paths: RunPaths, methods: list[str], datasets) -> dict:
    """{(method, split): the import's params} of the imported methods; ConfigError for an unknown method."""
    from proposals import METHODS

    unknown = [m for m in methods if not known_method(m)]
    if unknown:
        raise ConfigError(f"config key 'sweep.methods': unknown method(s) {unknown} (choose from {', '.join(METHODS)}, "
                          "or imported:<name> for a store made by pipelines.import_proposals)")
    return {(m, ds.split): _imported_store(cfg, paths, m, ds).meta["params"]
            for m in filter(is_imported, methods) for ds in datasets}


def _training_fingerprints(cfg: Config, methods: list[str], stores: dict, train_ds) -> dict:
    """{(method, top or None): fingerprint of the training proposals that detector reads} (rank 0's, shared)."""
    from core.store import ProposalStore

    fingerprints = None
    if distributed.is_main():
        fingerprints = {}
        for m in methods:
            store = ProposalStore.open(stores[m, train_ds.split])
            tops = [None] + retrain_counts(cfg)
            reads = [(cfg.detector.train_top if top is None else top) or None for top in tops]
            fingerprints.update(zip(((m, t) for t in tops), store.fingerprints(reads, train_ds.image_ids)))
    return distributed.broadcast_object(fingerprints)


def _train_detectors(cfg: Config, paths: RunPaths, stages: Stages, keys: dict, methods: list[str], stores: dict,
                     train_ds, progress: bool) -> None:
    """The detector stages: per method and seed the fixed-protocol detector, and the re-trained ones."""
    seen = set()
    for method in methods:
        jobs = [(None, s, f) for s, f in paths.detectors(cfg, method)] + paths.retrained(cfg, method)
        for top, seed, folder in jobs:
            name = detector_stage(method, seed, cfg, top)
            if name in seen:  # a re-train N equal to detector.train_top: the fixed detector, trained once
                continue
            seen.add(name)
            k = keys[name]
            run_cfg = dataclasses.replace(cfg, seed=seed)
            if top is not None:
                run_cfg = dataclasses.replace(run_cfg, detector=dataclasses.replace(cfg.detector, train_top=top))
            stages.run(name, k["key"], lambda c=run_cfg, m=method, f=folder: _train_detector(
                c, stores[m, train_ds.split], train_ds, f, progress), outputs=folder, resume_key=k["resume_key"])


def _imported_store(cfg: Config, paths: RunPaths, method: str, ds):
    """The store of an imported method for split `ds`, checked: it must exist at the run's store path."""
    from core.store import ProposalStore

    out = paths.store(method, ds.split)
    if not (out / "meta.json").is_file():
        raise ConfigError(f"config key 'sweep.methods': {method}: no proposal store at {out}; make it with "
                          f"`python -m pipelines.import_proposals FILE --voc {cfg.data.voc} --split {ds.split} "
                          f"--name {method[len('imported:'):]} --out {out}`")
    store = ProposalStore.open(out)
    store.check(ds.name, ds.split)
    if store.method != method:
        raise ConfigError(f"{out}: a store of method {store.method!r}, not {method!r}")
    return store


def _train_deepmask(cfg: Config, out_dir: Path, progress: bool) -> str:
    from proposals.deepmask.train import train_deepmask

    result = train_deepmask(cfg, out_dir, progress=progress)
    return str(result["best"] if isinstance(result, dict) else result)


def _extract(cfg: Config, method: str, dataset, out: Path, dm_ckpt, progress: bool) -> str:
    from proposals import extract_proposals

    workers = cfg.ss.workers if method == "selective_search" else cfg.deepmask.workers
    extract_proposals(cfg, method, dataset, out, checkpoint=dm_ckpt, workers=workers, progress=progress)
    return str(out)


def _train_detector(cfg: Config, store: str, dataset, out_dir: Path, progress: bool) -> str:
    from detector.train import train_detector

    res = train_detector(cfg, store, dataset, out_dir, progress=progress)
    if not res.get("final"):
        raise RuntimeError(f"detector training in {out_dir} stopped before the end")
    return str(res["final"])
