"""Stage identity from one source (core/config.py field metadata): every config field reruns exactly the stages it
affects; a test-time setting never retrains a model; a different image subset never reuses stale results; outputs
of an older identity are moved aside, never deleted."""
import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import pytest

from core.config import (DET_TEST, DET_TRAIN, DM_INFER, DM_TRAIN, RANDOM, REPORT, SS, SWEEP, TEST_SPLIT,
                         TRAIN_SPLIT, Config, MaskSource, field_info, leaf_fields, load_config)
from pipelines.experiment import stage_keys

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["deepmask", "selective_search", "random"]
TAG_OF_METHOD = {"deepmask": DM_INFER, "selective_search": SS, "random": RANDOM}
TRAIN_ID = {"dataset": "voc:/x", "split": "trainval", "images": 3, "ids_sha1": "a"}
TEST_ID = {"dataset": "voc:/x", "split": "test", "images": 2, "ids_sha1": "b"}


def _expected(tags: tuple, stages) -> set[str]:
    """The pipeline's dependency graph, written out by hand: which of `stages` a field tagged `tags` must rerun
    (each stage reruns the stages that read it: DeepMask -> its proposals -> its detectors -> the sweep)."""
    out = set()
    for m in METHODS:
        for split in ("TRAIN", "TEST"):
            if TAG_OF_METHOD[m] in tags or (m == "deepmask" and DM_TRAIN in tags) or \
                    (TRAIN_SPLIT in tags and split == "TRAIN") or (TEST_SPLIT in tags and split == "TEST"):
                out.add(f"proposals_{m}_{split}")
                if split == "TRAIN":  # every detector of the method: fixed, re-trained at N, every seed
                    out |= {s for s in stages if s.startswith(f"train_detector_{m}")}
        if DET_TRAIN in tags:
            out |= {s for s in stages if s.startswith(f"train_detector_{m}")}
    if DM_TRAIN in tags:
        out.add("train_deepmask")
    if out or DET_TEST in tags or SWEEP in tags:
        out.add("sweep")
    if "sweep" in out or REPORT in tags:  # the report shows the sweep
        out.add("report")
    return out & set(stages)


def _roles(keys: dict, cfg) -> dict:
    """Stage names with the split names replaced by their role (a renamed split is the same stage)."""
    out = {}
    for name, v in keys.items():
        for split, role in ((cfg.data.train_split, "TRAIN"), (cfg.data.test_split, "TEST")):
            if name.endswith("_" + split):
                name = name[: -len(split)] + role
                break
        out[name] = v["key"]
    return out


def _other(value, tp):
    """A different value of the same type."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        new = {int: 7, float: 0.3, str: "other", MaskSource: MaskSource("a.json", "imgs")}[item]
        return list(value) + [new]
    if tp is bool:
        return not value
    if tp is int:
        return value + 1
    if tp is float:
        return value + 0.125
    if tp is str:
        return value + "x"
    raise AssertionError(f"no test value for {tp}")


def _replace(cfg, key: str, value):
    parts = key.split(".")
    if len(parts) == 1:
        return dataclasses.replace(cfg, **{key: value})
    sec = getattr(cfg, parts[0])
    return dataclasses.replace(cfg, **{parts[0]: dataclasses.replace(sec, **{parts[1]: value})})


def _types():
    hints = {}
    for key, f in leaf_fields():
        parent = Config if "." not in key else typing.get_type_hints(Config)[key.split(".")[0]]
        hints[key] = typing.get_type_hints(parent)[f.name]
    return hints


TYPES = _types()
BASE = dataclasses.replace(Config(), sweep=dataclasses.replace(Config().sweep, methods=list(METHODS), seeds=[0, 1],
                                                                retrain_counts=[100, 2000]))


def test_every_field_declares_what_it_affects():
    for key, f in leaf_fields():
        assert "affects" in f.metadata, f"config field '{key}' does not say what it affects (use core.config.opt)"


@pytest.mark.parametrize("key", sorted(TYPES))
def test_changing_a_field_reruns_exactly_the_stages_it_affects(key):
    node = BASE
    for p in key.split("."):
        node = getattr(node, p)
    changed = _replace(BASE, key, node[:-1] if key == "sweep.methods" else _other(node, TYPES[key]))
    a = _roles(stage_keys(BASE, TRAIN_ID, TEST_ID), BASE)
    b = _roles(stage_keys(changed, TRAIN_ID, TEST_ID), changed)
    common = set(a) & set(b)  # sweep.methods / sweep.seeds change which stages exist
    rerun = {s for s in common if a[s] != b[s]}
    expected = _expected(field_info(key)["affects"], common)
    assert rerun == expected, f"{key}: reruns {sorted(rerun)}, its metadata says {sorted(expected)}"


def test_the_image_ids_of_a_split_are_part_of_the_keys():
    a = stage_keys(BASE, TRAIN_ID, TEST_ID)
    b = stage_keys(BASE, TRAIN_ID, {**TEST_ID, "ids_sha1": "c"})
    assert {s for s in a if a[s] != b[s]} == {f"proposals_{m}_test" for m in METHODS} | {"sweep", "report"}
    c = stage_keys(BASE, {**TRAIN_ID, "images": 2, "ids_sha1": "d"}, TEST_ID)
    assert {s for s in a if a[s] != c[s]} == ({f"proposals_{m}_trainval" for m in METHODS} |
                                               {s for s in a if s.startswith("train_detector_")} | {"sweep", "report"})


def test_retrain_protocol_detectors_are_stages_of_their_own():
    """One detector per (method, N, seed) of sweep.retrain_counts; N = detector.train_top is the fixed detector."""
    keys = stage_keys(BASE, TRAIN_ID, TEST_ID)
    for m in METHODS:
        assert {n for n in keys if n.startswith(f"train_detector_{m}")} == {
            f"train_detector_{m}", f"train_detector_{m}_seed1", f"train_detector_{m}_top100",
            f"train_detector_{m}_top100_seed1"}  # top2000 = detector.train_top: the fixed detectors
        assert keys[f"train_detector_{m}_top100"]["key"] != keys[f"train_detector_{m}"]["key"]
    from pipelines.experiment import RunPaths

    jobs = RunPaths(Path("r")).retrained(BASE, "deepmask")
    assert [(n, s, f.name) for n, s, f in jobs] == [
        (100, 0, "detector_deepmask_top100"), (100, 1, "detector_deepmask_top100_seed1"),
        (2000, 0, "detector_deepmask"), (2000, 1, "detector_deepmask_seed1")]


def test_detector_seeds_are_stages_of_their_own():
    cfg = dataclasses.replace(BASE, sweep=dataclasses.replace(BASE.sweep, seeds=[0, 1, 2]))
    keys = stage_keys(cfg, TRAIN_ID, TEST_ID)
    for m in METHODS:
        names = [f"train_detector_{m}", f"train_detector_{m}_seed1", f"train_detector_{m}_seed2"]
        assert len({keys[n]["key"] for n in names}) == 3
    # adding a seed leaves the detectors of the others as they were
    assert keys["train_detector_deepmask_seed1"] == stage_keys(BASE, TRAIN_ID, TEST_ID)["train_detector_deepmask_seed1"]


def test_resumable_fields_keep_the_resume_key():
    base = stage_keys(BASE, TRAIN_ID, TEST_ID)
    for key in ("deepmask.iters", "detector.iters", "deepmask.val_every"):
        assert field_info(key)["resume"]
        k = stage_keys(_replace(BASE, key, 5), TRAIN_ID, TEST_ID)
        stage = "train_deepmask" if key.startswith("deepmask") else "train_detector_deepmask"
        assert k[stage]["key"] != base[stage]["key"] and k[stage]["resume_key"] == base[stage]["resume_key"]
    k = stage_keys(_replace(BASE, "detector.lr", 0.5), TRAIN_ID, TEST_ID)
    assert k["train_detector_deepmask"]["resume_key"] != base["train_detector_deepmask"]["resume_key"]


# ------------------------------------------------------------------------------------------- on a tiny real run
TINY = [
    "deepmask.trunk=small", "deepmask.pretrained=", "detector.trunk=small", "detector.pretrained=",
    "data.synthetic_trainval=6", "data.synthetic_test=4", "data.synthetic_size=128",
    "deepmask.iters=2", "deepmask.batch_size=8", "deepmask.val_every=2", "deepmask.val_batches=1",
    "deepmask.checkpoint_every=2", "deepmask.workers=0", "deepmask.top_n=60", "deepmask.object_range=[22.63,128]",
    "ss.workers=1", "ss.top_n=60", "detector.iters=2", "detector.checkpoint_every=2", "detector.lr_steps=[1]",
    "detector.workers=0", "detector.scales=[128]", "detector.test_scale=128", "detector.train_top=40",
    "sweep.counts=[10,50]", "sweep.seeds=[]", "sweep.retrain_counts=[]",  # one detector per method
]


def _checkpoints(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*.pt"))
            if "stale" not in p.parts}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data):
    from pipelines.experiment import run_experiment

    work = tmp_path_factory.mktemp("identity")
    base = TINY + [f"out_dir={work / 'runs'}", "name=tiny", f"data.synthetic_root={tiny_data}"]

    def run(*extra):
        cfg = load_config(str(ROOT / "configs/shapes.yaml"), base + list(extra))
        return run_experiment(cfg, progress=False)

    first = run()
    return run, work / "runs" / "tiny", first


def test_test_time_settings_never_retrain(tiny):
    run, root, first = tiny
    assert {"train_deepmask", "train_detector_deepmask", "train_detector_selective_search",
            "sweep"} <= set(first["stages_run"])
    before = _checkpoints(root)
    assert any(k.startswith("deepmask/") for k in before) and any(k.startswith("detector_") for k in before)
    # inference and test settings: proposals re-extracted, detections re-tested, every checkpoint byte-identical
    # (the detectors read the top detector.train_top=40 boxes, which a top_n of 50 instead of 60 leaves as they are)
    s = run("deepmask.top_n=50", "detector.score_thresh=0.1")
    assert set(s["stages_run"]) == {"proposals_deepmask_trainval", "proposals_deepmask_test", "sweep", "report"}
    assert _checkpoints(root) == before
    s = run("deepmask.top_n=50", "detector.score_thresh=0.2")
    assert s["stages_run"] == ["sweep", "report"]
    assert _checkpoints(root) == before
    # fewer proposals than the detector trains on: its inputs changed, so it (alone) is retrained
    s = run("deepmask.top_n=30", "detector.score_thresh=0.2")
    assert set(s["stages_run"]) == {"proposals_deepmask_trainval", "proposals_deepmask_test",
                                    "train_detector_deepmask", "sweep", "report"}
    after = _checkpoints(root)
    assert {k: v for k, v in after.items() if not k.startswith("detector_deepmask")} == \
        {k: v for k, v in before.items() if not k.startswith("detector_deepmask")}
    # what was replaced was moved aside, not deleted
    stale = root / "stale"
    assert any(stale.glob("proposals_deepmask_test-*/deepmask_test/meta.json"))
    assert any(stale.glob("train_detector_deepmask-*/detector_deepmask/final.pt"))
    assert any(stale.glob("sweep-*/sweep.json"))


def test_a_smaller_subset_recomputes_and_retrains(tiny):
    run, root, _ = tiny
    base = ("deepmask.top_n=30", "detector.score_thresh=0.2")
    dm_before = {k: v for k, v in _checkpoints(root).items() if k.startswith("deepmask/")}
    s = run(*base, "data.test_images=2")
    assert "sweep" in s["stages_run"] and s["test_images"] == 2
    assert not any(n.startswith("train_") for n in s["stages_run"])
    s = run(*base, "data.test_images=2", "data.train_images=4")
    assert {"train_detector_deepmask", "train_detector_selective_search", "sweep"} <= set(s["stages_run"])
    assert "train_deepmask" not in s["stages_run"]
    assert {k: v for k, v in _checkpoints(root).items() if k.startswith("deepmask/")} == dm_before


def test_an_imported_store_is_a_method_of_the_run(tiny, tmp_path):
    """sweep.methods can name imported:<name>: the run trains its detector and sweeps it, never recomputes or moves
    the store, and a second run skips everything."""
    from core.datasets import VOCDataset
    from core.store import ProposalStore
    from proposals.importing import export_store, import_proposals

    run, root, _ = tiny
    base = ("deepmask.top_n=30", "detector.score_thresh=0.2", "data.test_images=2", "data.train_images=4")
    run(*base)
    cfg = load_config(str(root / "config.yaml"))
    for split in ("trainval", "test"):
        ds = VOCDataset(cfg.data.voc, split, max_images=4 if split == "trainval" else 2)
        export_store(ProposalStore.open(root / "proposals" / f"selective_search_{split}"), tmp_path / f"{split}.npz",
                     "npz")
        import_proposals(tmp_path / f"{split}.npz", ds, root / "proposals" / f"imported:mine_{split}", name="mine",
                         progress=False)
    methods = "sweep.methods=[deepmask,selective_search,imported:mine]"
    s = run(*base, methods)
    assert set(s["stages_run"]) == {"train_detector_imported:mine", "sweep", "report"}
    assert {r["N"] for r in s["rows"] if r["method"] == "imported:mine"} == {10, 50}
    assert (root / "detector_imported:mine" / "final.pt").is_file()
    assert run(*base, methods)["stages_run"] == []
    with pytest.raises(Exception, match="no proposal store"):
        run(*base, "sweep.methods=[imported:other]")


def test_a_hand_run_sweep_takes_the_report_aside_and_the_run_rebuilds_it(tiny):
    """pipelines.sweep by hand under other settings: the run's report shows the earlier sweep's numbers, so it is
    kept with them in stale/sweep-<key>/, and the next pipelines.run rebuilds the report with its own sweep (a record
    saying "done" would have skipped it, leaving the run without a report)."""
    from pipelines.sweep import main as sweep_main

    run, root, _ = tiny
    base = ("deepmask.top_n=30", "detector.score_thresh=0.2", "data.test_images=2", "data.train_images=4")
    run(*base)
    assert (root / "report" / "index.html").is_file()
    before = set((root / "stale").iterdir()) if (root / "stale").is_dir() else set()
    assert sweep_main(["--run", str(root), "--set", "detector.score_thresh=0.5"]) == 0
    new = set((root / "stale").iterdir()) - before
    assert len(new) == 1 and next(iter(new)).name.startswith("sweep-")
    kept = next(iter(new))
    assert (kept / "sweep.json").is_file() and (kept / "report" / "index.html").is_file()
    assert not (root / "report").exists() and (root / "sweep.json").is_file()
    marker = json.loads((root / "stages" / "report.done.json").read_text())
    assert marker["status"] != "done" and marker["key"].startswith("standalone-")
    s = run(*base)
    assert s["stages_run"] == ["sweep", "report"]
    assert (root / "report" / "index.html").is_file()
    assert run(*base)["stages_run"] == []
