"""The whole experiment as resumable stages: data -> DeepMask -> proposals -> Fast R-CNN per method -> sweep.

Each stage writes its outputs under ``runs/<name>/`` and, last, a ``<stage>.done.json`` marker holding a hash of
everything the stage depends on (its config section, its inputs). A stage whose marker matches is skipped, so a
stopped run resumes where it was, and a second run of the same config finishes in seconds. Inside a stage the
library's own checkpoints (training) and per-image files (proposal stores) resume unfinished work.

Under ``torchrun`` (core/distributed.py) every rank runs this same sequence: rank 0 alone makes the data and writes
the stage markers (the others wait at barriers and take its decisions), and all ranks join each stage, which the
library distributes itself (DDP training, sharded extraction and testing).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from core import distributed
from core.config import CocoSource, Config, save_config, section_hash
from core.errors import ConfigError
from core.io import read_json, write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunPaths:
    root: Path

    @property
    def deepmask(self) -> Path:
        return self.root / "deepmask"

    def store(self, method: str, split: str) -> Path:
        return self.root / "proposals" / f"{method}_{split}"

    def detector(self, method: str) -> Path:
        return self.root / f"detector_{method}"

    @property
    def sweep(self) -> Path:
        return self.root


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
            dm = dataclasses.replace(dm, train_sets=[CocoSource(
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
    """Runs named stages once per (name, dependency hash)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.timings: dict[str, float] = {}

    def _marker(self, name: str) -> Path:
        return self.root / "stages" / f"{name}.done.json"

    def is_done(self, name: str, key: str) -> bool:
        m = self._marker(name)
        if not m.is_file():
            return False
        st = read_json(m)
        return st.get("key") == key and st.get("status") == "done"

    def run(self, name: str, key: str, fn, outputs: Path | None = None):
        """Run `fn` unless stage `name` is done for `key`. When the stage last ran (or started) for another key,
        its `outputs` are removed first, so that stale results of an older config are never mixed in; a stage
        that was interrupted under the same key keeps them, and the library resumes from them."""
        marker = self._marker(name)
        main = distributed.is_main()  # torchrun: rank 0 decides and writes the markers, every rank runs fn
        if distributed.broadcast_object(self.is_done(name, key) if main else None):
            log.info("stage %-34s skipped (done for this config)", name)
            return read_json(marker).get("result")
        if main:
            if marker.is_file() and read_json(marker).get("key") != key and outputs is not None and outputs.exists():
                log.info("stage %-34s config changed: removing %s", name, outputs)
                shutil.rmtree(outputs)
            write_json(marker, {"key": key, "status": "running"})
        distributed.barrier()
        log.info("stage %-34s running", name)
        t0 = time.time()
        result = fn()
        dt = time.time() - t0
        self.timings[name] = dt
        if main:
            write_json(marker, {"key": key, "status": "done", "result": result, "seconds": round(dt, 1)}, indent=1)
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
    from proposals import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"config key 'sweep.methods': unknown method(s) {unknown} (choose from {', '.join(METHODS)})")

    # 1. DeepMask
    dm_ckpt = None
    if "deepmask" in methods:
        dm_key = section_hash({"deepmask": cfg.deepmask, "seed": cfg.seed})
        dm_ckpt = stages.run("train_deepmask", dm_key, lambda: _train_deepmask(cfg, paths.deepmask, progress),
                             outputs=paths.deepmask)

    # 2. proposals of both methods for the detector's train and test splits
    stores: dict[tuple[str, str], str] = {}
    from proposals import proposer_params

    for method in methods:
        params = proposer_params(method, cfg, dm_ckpt)
        for ds in (train_ds, test_ds):
            key = section_hash({"params": params, "dataset": ds.name, "split": ds.split})
            out = paths.store(method, ds.split)
            stores[method, ds.split] = stages.run(
                f"proposals_{method}_{ds.split}", key,
                lambda m=method, d=ds, o=out: _extract(cfg, m, d, o, dm_ckpt, progress), outputs=out)

    # 3. one Fast R-CNN per method
    detectors: dict[str, str] = {}
    for method in methods:
        key = section_hash({"detector": cfg.detector, "seed": cfg.seed, "store": stores[method, train_ds.split],
                            "store_key": read_json(Path(stores[method, train_ds.split]) / "meta.json")["params"]})
        detectors[method] = stages.run(
            f"train_detector_{method}", key,
            lambda m=method: _train_detector(cfg, stores[m, train_ds.split], train_ds, paths.detector(m), progress),
            outputs=paths.detector(method))

    # 4. the sweep, plots and the summary
    from pipelines.sweep import run_sweep

    key = section_hash({"sweep": cfg.sweep, "detectors": detectors, "det": cfg.detector,
                        "stores": {f"{m}/{s}": v for (m, s), v in stores.items()}})
    stages.run("sweep", key, lambda: run_sweep(paths.root, cfg=cfg, progress=progress) and "sweep.json")
    summary = read_json(paths.root / "sweep.json")
    return summary


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
