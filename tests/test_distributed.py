"""Distributed: the entry points under a real ``torchrun --nproc_per_node=2`` (gloo on CPU), sharded
extraction and testing (ranks and independent ``--shard I/N`` jobs) against single-process runs.

One torchrun launch (the module fixture) runs this file as a script (``--harness SPEC``): in one process group of 2
ranks it calls, in turn, the ``main`` of pipelines.train_proposer, pipelines.propose (DeepMask and SelectiveSearch
on the test split: 3 images, so DistributedSampler pads one duplicate), pipelines.train_detector,
pipelines.test_detector, pipelines.run (the whole experiment, twice: the second run skips every stage), and the
library's train_detector stopped at iteration 2 and resumed (exact resume with 2 ranks). Paying torch's import once
per rank keeps the file fast. The references run in the pytest process.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core import distributed  # noqa: E402

torch.set_num_threads(1)

DM = {"deepmask.trunk": "small", "deepmask.pretrained": "", "deepmask.patch_size": 48, "deepmask.object_size": 24,
      "deepmask.mask_size": 8,
      "deepmask.seg_channels": 8, "deepmask.lowrank_dim": 8, "deepmask.score_hidden": "[8, 8]",
      "deepmask.batch_size": 4, "deepmask.pos_shift": 4, "deepmask.neg_shift": 8, "deepmask.workers": 0,
      "deepmask.val_batches": 1, "deepmask.val_every": 2, "deepmask.checkpoint_every": 2, "deepmask.iters": 4,
      "deepmask.val_fraction": 0.34, "deepmask.lr": 0.01, "deepmask.min_area": 20, "deepmask.lr_scaling": "linear",
      "deepmask.object_range": "[24, 48]", "deepmask.top_n": 30}
DET = {"detector.trunk": "small", "detector.pretrained": "", "detector.fc_dim": 32, "detector.scales": "[64]",
       "detector.test_scale": 64, "detector.max_size": 96, "detector.workers": 0, "detector.log_every": 1,
       "detector.lr": 0.01, "detector.train_top": 0, "detector.iters": 4, "detector.checkpoint_every": 2,
       "detector.lr_steps": "[3]", "detector.lr_scaling": "linear",
       "detector.score_thresh": 0.01}  # 4 iterations: class scores ~1/21, below the default 0.05
TOPS = "5,20"
# pipelines.run on the synthetic set (configs/shapes.yaml made tiny)
RUN = {"data.synthetic_trainval": 4, "data.synthetic_test": 3, "data.synthetic_size": 64, "ss.workers": 1,
       "ss.top_n": 50, "sweep.counts": "[5,20]", "sweep.seeds": "[]", "sweep.retrain_counts": "[]", "name": "tiny",
       **{k: v for k, v in DM.items() if k != "deepmask.lr_scaling"},
       **{k: v for k, v in DET.items() if k not in ("detector.log_every", "detector.lr_scaling")}}


def sets(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in ("--set", f"{k}={v}")]


# ------------------------------------------------------------------------------------------------ torchrun harness
def _harness(spec: dict) -> None:
    """Runs on every rank under torchrun: the entry points' ``main`` in one process group, in turn."""
    import importlib

    from core.cli import setup_logging
    from core.config import load_config
    from core.datasets import VOCDataset
    from detector.train import train_detector

    setup_logging()
    for module, argv in spec["entries"]:
        assert importlib.import_module(module).main(argv) in (0, None), module
    # exact resume with 2 ranks: stop after iteration 2 (a checkpoint), resume to the end
    cfg = load_config(None, [f"{k}={v}" for k, v in DET.items()] + [f"data.voc={spec['voc']}"])
    ds = VOCDataset(spec["voc"], "trainval")
    assert train_detector(cfg, spec["ss_train"], ds, spec["det_resumed"], stop_after=2, progress=False)["final"] is None
    assert train_detector(cfg, spec["ss_train"], ds, spec["det_resumed"], progress=False)["iteration"] == 4
    assert distributed.world_size() == 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from core.config import load_config
    from core.datasets import VOCDataset
    from core.synthetic import generate
    from proposals import extract_proposals

    root = tmp_path_factory.mktemp("dist")
    # a set of its own, smaller than the tiny run's: every entry point runs in two processes sharing two cores
    generate(root / "shapes", trainval=4, test=3, size=64, seed=3, workers=1, progress=False)
    voc = root / "shapes" / "VOC2007"
    train, test = VOCDataset(voc, "trainval"), VOCDataset(voc, "test")
    cfg = load_config(None, [])
    ss_train = extract_proposals(cfg, "selective_search", train, root / "ss_train", progress=False).path
    ss_test = extract_proposals(cfg, "selective_search", test, root / "ss_test", progress=False).path
    p = {k: root / k for k in ("dm", "dm_test_2r", "ss_test_2r", "det", "det_resumed", "res_2r")}
    # leftovers of an interrupted torchrun extraction with another config / number of processes: replaced
    from core.store import ProposalStore

    ProposalStore.create(root / "ss_test_2r.shards" / "0-of-2", method="selective_search", params={"old": 1},
                         dataset=test.name, split=test.split, image_ids=test.image_ids[:2])
    (root / "ss_test_2r.shards" / "1-of-4").mkdir()
    src = f"deepmask.train_sets=[{{ann: '{root / 'shapes/annotations/instances_trainval.json'}', " \
          f"images: '{voc / 'JPEGImages'}'}}]"
    dataset = ["--voc", str(voc), "--split", "test"]
    entries = [
        ("pipelines.train_proposer", ["--out", str(p["dm"]), "--no-progress", "--set", src, *sets(DM)]),
        ("pipelines.propose", ["--method", "deepmask", "--checkpoint", str(p["dm"] / "best.pt"), *dataset, "--out",
                               str(p["dm_test_2r"]), "--no-progress", *sets(DM)]),
        ("pipelines.propose", [*dataset, "--out", str(p["ss_test_2r"]), "--workers", "1", "--no-progress"]),
        ("pipelines.train_detector", ["--proposals", str(ss_train), "--voc", str(voc), "--split", "trainval",
                                      "--out", str(p["det"]), "--no-progress", *sets(DET)]),
        ("pipelines.test_detector", ["--checkpoint", str(p["det"] / "final.pt"), "--proposals", str(ss_test),
                                     "--top", TOPS, "--out", str(p["res_2r"]), "--no-progress"]),
    ]
    run_argv = ["--config", str(REPO / "configs/shapes.yaml"), "--quiet", *sets({**RUN, "out_dir": root / "runs"})]
    entries += [("pipelines.run", run_argv), ("pipelines.run", run_argv)]
    spec = {"entries": entries, "voc": str(voc), "ss_train": str(ss_train), "det_resumed": str(p["det_resumed"])}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, "--harness", str(root / "spec.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"root": root, "voc": voc, "train": train, "test": test, "ss_train": ss_train, "ss_test": ss_test,
            "seconds": time.time() - t0, "log": proc.stderr, "stdout": proc.stdout, **p}


# ------------------------------------------------------------------------------------------------ helpers
def _assert_same_store(a_path, b_path):
    from core.store import ProposalStore

    a, b = ProposalStore.open(a_path), ProposalStore.open(b_path)
    assert a.meta == b.meta  # same identity, image order, completeness
    for iid in b.image_ids:
        x, y = a.get(iid), b.get(iid)
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.scores, y.scores), iid
        assert x.masks == y.masks, iid
    assert not Path(str(a_path) + ".shards").exists()  # shard stores removed after the merge


def _assert_same_detections(a_dir, b_dir, tops=(5, 20)):
    for n in tops:
        assert len(json.loads((Path(b_dir) / f"top{n}" / "detections.json").read_text())) >= 10
        for f in sorted((Path(b_dir) / f"top{n}").iterdir()):  # detections.json, metrics.json, devkit files
            assert (Path(a_dir) / f"top{n}" / f.name).read_bytes() == f.read_bytes(), f
    ra, rb = (json.loads((Path(d) / "results.json").read_text()) for d in (a_dir, b_dir))
    assert ra["mAP"] == rb["mAP"] and ra["per_top"] == rb["per_top"]
    assert not (Path(a_dir) / "shards").exists()


def _initial(build, seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return build().state_dict()


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.slow
@pytest.mark.e2e
def test_train_proposer_under_torchrun(run):
    from core.config import from_dict
    from core.io import load_checkpoint
    from proposals.deepmask.model import build_deepmask
    from proposals.deepmask.train import load_deepmask

    ck = load_checkpoint(run["dm"] / "last.pt")
    assert ck["iteration"] == DM["deepmask.iters"]
    rep = ck["distributed"]  # each rank's state hash, gathered at the checkpoint
    assert rep["world_size"] == 2 and rep["identical"] and len(set(rep["state_sha256"])) == 1
    assert rep["state_sha256"][0] == distributed.state_hash(load_deepmask(run["dm"] / "last.pt")[0])
    assert len(ck["rng_ranks"]) == 2
    cfg = from_dict(ck["config"])
    init = _initial(lambda: build_deepmask(cfg.deepmask), cfg.seed)
    moved = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(init) // 2, "training did not change the weights"
    assert [m["iteration"] for m in json.loads((run["dm"] / "metrics.json").read_text())] == [2, 4]
    load_deepmask(run["dm"] / "best.pt")  # the best checkpoint loads too


@pytest.mark.slow
@pytest.mark.e2e
def test_train_detector_under_torchrun(run):
    from core.config import from_dict
    from core.io import load_checkpoint
    from detector.model import build_detector
    from detector.model import load_detector

    ck = load_checkpoint(run["det"] / "final.pt")
    rep = ck["distributed"]
    assert rep["world_size"] == 2 and rep["identical"] and len(set(rep["state_sha256"])) == 1
    model, _ = load_detector(run["det"] / "final.pt")
    assert rep["state_sha256"][0] == distributed.state_hash(model)
    cfg = from_dict(ck["config"])
    init = _initial(lambda: build_detector(cfg.detector, len(ck["classes"])), cfg.seed)
    moved = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(init) // 2, "training did not change the weights"
    hist = ck["history"]
    assert [h["iter"] for h in hist] == [1, 2, 3, 4] and all(np.isfinite(h["loss"]) for h in hist)
    # the global minibatch: 2 ranks x 2 images x 64 RoIs, counts summed over ranks; lr scaled linearly (x2)
    assert max(h["num_rois"] for h in hist) > 128  # one process: at most 128
    assert hist[0]["lr"] == pytest.approx(2 * DET["detector.lr"])
    # a run stopped at iteration 2 and resumed (2 ranks) ends exactly where the uninterrupted one does
    res = load_checkpoint(run["det_resumed"] / "final.pt")
    for k, v in ck["model"].items():
        assert torch.equal(res["model"][k], v), k
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in hist]


# ------------------------------------------------------------------------------------------------ extraction, test
@pytest.mark.slow
@pytest.mark.e2e
def test_proposals_of_two_ranks_equal_one_process(run):
    from core.config import load_config
    from proposals import extract_proposals

    cfg = load_config(None, [f"{k}={v}" for k, v in DM.items()])
    ref = extract_proposals(cfg, "deepmask", run["test"], run["root"] / "dm_test_1p",
                            checkpoint=str(run["dm"] / "best.pt"), progress=False)
    assert ref.has_masks and all(len(ref.get(i).boxes) > 0 for i in ref.image_ids)
    _assert_same_store(run["dm_test_2r"], ref.path)
    _assert_same_store(run["ss_test_2r"], run["ss_test"])


@pytest.mark.slow
@pytest.mark.e2e
def test_detections_of_two_ranks_equal_one_process(run):
    from detector.test import test_detector

    res = test_detector(run["det"] / "final.pt", run["ss_test"], run["test"], [5, 20], run["root"] / "res_1p",
                        progress=False)
    assert set(res) == {5, 20}
    _assert_same_detections(run["res_2r"], run["root"] / "res_1p")


@pytest.mark.slow
@pytest.mark.e2e
def test_independent_shard_jobs_merge_to_one_process(run, tmp_path):
    """--shard I/N as separate jobs (here in-process), then --merge: the single-process store and detections."""
    from test_robustness_common import assert_ok, run_entry

    dataset = ["--voc", run["voc"], "--split", "test"]
    for i in range(2):
        assert_ok(run_entry("pipelines.propose", [*dataset, "--out", tmp_path / f"ss{i}", "--shard", f"{i}/2",
                                                  "--workers", 1, "--no-progress"]))
    assert_ok(run_entry("pipelines.propose", [*dataset, "--out", tmp_path / "ss", "--merge", tmp_path / "ss0",
                                              tmp_path / "ss1"]))
    _assert_same_store(tmp_path / "ss", run["ss_test"])

    det = ["--checkpoint", run["det"] / "final.pt", "--proposals", run["ss_test"], "--top", TOPS, "--out",
           tmp_path / "res", "--no-progress"]
    r = run_entry("pipelines.test_detector", [*det, "--merge"])  # before the shards exist: one clear line
    assert r.code == 2 and "shards" in r.error_lines[0], r
    for i in range(3):  # 3 shards of 3 images
        assert_ok(r := run_entry("pipelines.test_detector", [*det, "--shard", f"{i}/3"]))
        assert json.loads(r.out.strip().splitlines()[-1])["images"] == 1
    assert_ok(run_entry("pipelines.test_detector", [*det, "--merge"]))
    for n in (5, 20):
        for f in sorted((run["res_2r"] / f"top{n}").iterdir()):
            assert (tmp_path / "res" / f"top{n}" / f.name).read_bytes() == f.read_bytes(), f


@pytest.mark.slow
@pytest.mark.e2e
def test_pipeline_run_under_torchrun(run):
    from core.io import load_checkpoint, read_json

    tiny = run["root"] / "runs" / "tiny"
    for name in ("figure5.png", "recall.png", "sweep.json", "sweep.csv", "deepmask/best.pt",
                 "proposals/deepmask_test/meta.json", "proposals/selective_search_trainval/meta.json"):
        assert (tiny / name).is_file(), name
    for method in ("deepmask", "selective_search"):
        rep = load_checkpoint(tiny / f"detector_{method}" / "final.pt")["distributed"]
        assert rep["world_size"] == 2 and rep["identical"], method
    markers = sorted((tiny / "stages").glob("*.done.json"))  # DeepMask, 4 stores, 2 detectors, sweep, report
    assert len(markers) == 9 and all(read_json(m)["status"] == "done" for m in markers)
    assert not list(tiny.glob("proposals/*.shards")) and not list(tiny.glob("results/*/shards"))
    summary = read_json(tiny / "sweep.json")
    assert {(r["method"], r["N"]) for r in summary["rows"]} == {(m, n) for m in ("deepmask", "selective_search")
                                                                for n in (5, 20)}
    # the second run skipped every stage; rank 0 alone logged and printed the summary (once per run)
    assert run["log"].count("skipped (done for this config)") == len(markers)
    assert run["stdout"].count("Fast R-CNN mAP (%)") == 2


# ------------------------------------------------------------------------------------------------ single process
@pytest.mark.e2e
def test_propose_under_torchrun_small(tiny_data, tmp_path):
    """The quick variant: two processes share the extraction of the tiny set's test split; the store equals one
    process's."""
    argv = ["--method", "random", "--voc", str(tiny_data / "VOC2007"), "--split", "test", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pipelines.propose", *argv, "--out", str(tmp_path / "two")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from pipelines.propose import main

    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    _assert_same_store(tmp_path / "two", tmp_path / "one")


def test_single_process_helpers_are_identities():
    from torch.utils.data import DistributedSampler

    from core.errors import ConfigError, UserError

    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    d = {"loss": 1.5, "num_rois": 3, "lr": 0.1}
    assert distributed.reduce_for_logging(d, mean_keys=("loss",), sum_keys=("num_rois",)) is d
    assert distributed.broadcast_object(d) is d and distributed.all_gather_object(d) is None
    assert distributed.run_on_main(lambda x: x + 1, 1) == 2
    assert distributed.lr_factor("linear", "detector.lr_scaling") == 1.0
    with pytest.raises(ConfigError, match="detector.lr_scaling"):
        distributed.lr_factor("sqrt", "detector.lr_scaling")
    m = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(m, torch.device("cpu")) is m and distributed.replica_check(m) is None
    assert distributed.rank_seed(5) == 5 and distributed.rank_seed(5, 1) != distributed.rank_seed(5, 2)
    # sharding: DistributedSampler's split, padded; every index in some shard
    for n, w in ((3, 2), (7, 3), (2, 4), (8, 4)):
        shards = [distributed.shard_indices(n, r, w) for r in range(w)]
        assert shards == [list(DistributedSampler(range(n), w, r, shuffle=False)) for r in range(w)]
        assert sorted(set(sum(shards, []))) == list(range(n)) and len({len(s) for s in shards}) == 1
    assert distributed.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            distributed.parse_shard(bad)


def test_config_refuses_unknown_lr_scaling():
    from core.config import load_config
    from core.errors import ConfigError

    assert load_config(None, ["detector.lr_scaling=linear"]).detector.lr_scaling == "linear"
    with pytest.raises(ConfigError, match="deepmask.lr_scaling"):
        load_config(None, ["deepmask.lr_scaling=quadratic"])


if __name__ == "__main__" and "--harness" in sys.argv:
    _harness(json.loads(Path(sys.argv[sys.argv.index("--harness") + 1]).read_text()))
