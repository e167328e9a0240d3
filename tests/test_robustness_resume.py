"""Kill and resume: a stage killed with SIGKILL at a random-ish moment and started again with the same
command continues from its last checkpoint (trainings) or its last finished image (proposal extraction), and ends
with exactly the result of an uninterrupted run. A damaged checkpoint is refused with a CheckpointError naming it;
a write interrupted half-way never replaces the file it was writing.

Each test runs the killed stage as a real ``python -m pipelines.X`` subprocess (the resume is by rerunning the same
command) and the uninterrupted reference in-process through the same entry point.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from core.io import load_checkpoint
from core.store import ProposalStore
from test_robustness_common import REPO, assert_ok, assert_user_error, run_entry, run_module, subprocess_env

torch.set_num_threads(1)

DM = {"deepmask.trunk": "small", "deepmask.patch_size": 48, "deepmask.object_size": 24, "deepmask.mask_size": 8,
      "deepmask.seg_channels": 8, "deepmask.lowrank_dim": 8, "deepmask.score_hidden": "[8, 8]",
      "deepmask.batch_size": 4, "deepmask.pos_shift": 4, "deepmask.neg_shift": 8, "deepmask.workers": 0,
      "deepmask.val_batches": 1, "deepmask.val_every": 5, "deepmask.checkpoint_every": 2, "deepmask.iters": 16,
      "deepmask.val_fraction": 0.34, "deepmask.lr": 0.01, "deepmask.min_area": 20}
DET = {"detector.trunk": "small", "detector.pretrained": "", "detector.fc_dim": 32, "detector.scales": "[96]",
       "detector.test_scale": 96, "detector.max_size": 128, "detector.workers": 0, "detector.log_every": 1,
       "detector.lr": 0.01, "detector.train_top": 0, "detector.iters": 16, "detector.checkpoint_every": 2,
       "detector.lr_steps": "[9]"}


def sets(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={v}"]
    return out


pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_data):
    """The session's 6 synthetic training images and their SelectiveSearch store (uninterrupted)."""
    from core.config import load_config
    from core.datasets import VOCDataset
    from proposals import extract_proposals

    root = tmp_path_factory.mktemp("resume")
    voc = tiny_data / "VOC2007"
    ds = VOCDataset(voc, "trainval")
    store = extract_proposals(load_config(None, []), "selective_search", ds, root / "ss_ref", progress=False)
    return {"root": root, "voc": voc, "ds": ds, "store": store.path,
            "coco": tiny_data / "annotations" / "instances_trainval.json",
            "images": voc / "JPEGImages"}


def kill_when(module: str, argv: list, ready, seed: int, timeout: float = 120) -> int:
    """Start ``python -m module argv``; once ``ready()`` holds, wait a random 0-150 ms and SIGKILL it.
    Returns the process's return code (-9 when the kill landed; the test then checks it was mid-run)."""
    p = subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], cwd=REPO, env=subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    try:
        while p.poll() is None and not ready():
            if time.time() - t0 > timeout:
                raise AssertionError(f"{module}: not ready after {timeout} s")
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 0.15))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    if p.returncode != -signal.SIGKILL:
        raise AssertionError(f"{module} ended with {p.returncode} before the kill: {p.stderr.read().decode()[-2000:]}")
    p.stderr.close()
    return p.returncode


# ------------------------------------------------------------------------------------------------ proposals
def test_propose_killed_and_resumed_equals_uninterrupted(shapes, tmp_path):
    out = tmp_path / "ss"
    argv = ["--voc", shapes["voc"], "--split", "trainval", "--out", out, "--workers", 1, "--no-progress"]
    images = out / "images"
    kill_when("pipelines.propose", argv, lambda: images.is_dir() and len(list(images.glob("*.npz"))) >= 1, seed=1)
    done = {p.name: p.stat().st_mtime_ns for p in images.glob("*.npz")}
    assert 1 <= len(done) < 6, done  # killed mid-run
    with pytest.raises(Exception, match="incomplete"):
        ProposalStore.open(out)  # an unfinished store is never read as complete
    assert_ok(run_module("pipelines.propose", argv))
    # finished images were not recomputed; every image is there and equals the uninterrupted run
    assert {k: v for k, v in ((p.name, p.stat().st_mtime_ns) for p in images.glob("*.npz")) if k in done} == done
    got, ref = ProposalStore.open(out), ProposalStore.open(shapes["store"])
    assert got.meta == ref.meta
    for iid in ref.image_ids:
        a, b = got.get(iid), ref.get(iid)
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores), iid


# ------------------------------------------------------------------------------------------------ DeepMask
def _dm_argv(shapes, out):
    src = f"deepmask.train_sets=[{{ann: '{shapes['coco']}', images: '{shapes['images']}'}}]"
    return ["--out", out, "--no-progress", "--set", src, *sets(DM)]


@pytest.mark.slow
def test_train_proposer_killed_and_resumed_equals_uninterrupted(shapes, tmp_path):
    out = tmp_path / "dm_killed"
    argv = _dm_argv(shapes, out)
    kill_when("pipelines.train_proposer", argv, lambda: (out / "last.pt").is_file(), seed=2)
    it = load_checkpoint(out / "last.pt")["iteration"]
    assert 2 <= it < DM["deepmask.iters"], it  # killed after a checkpoint, before the end
    assert_ok(run_module("pipelines.train_proposer", argv))
    assert_ok(run_entry("pipelines.train_proposer", _dm_argv(shapes, tmp_path / "dm_ref")))
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(out / name), load_checkpoint(tmp_path / "dm_ref" / name)
        assert a["iteration"] == b["iteration"] and a["best"] == b["best"], name
        for k, v in b["model"].items():
            assert torch.equal(a["model"][k], v), (name, k)
        for k, st in b["optimizer"]["state"].items():
            assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], st["momentum_buffer"]), (name, k)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((tmp_path / "dm_ref" / "metrics.json")
                                                                          .read_text())
    # a damaged last.pt is refused by name, not loaded half-way
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:2048])
    assert_user_error(run_entry("pipelines.train_proposer", argv), "last.pt", "cannot read checkpoint")


# ------------------------------------------------------------------------------------------------ Fast R-CNN
def _det_argv(shapes, out, **over):
    return ["--proposals", shapes["store"], "--voc", shapes["voc"], "--split", "trainval", "--out", out,
            "--no-progress", *sets({**DET, **{f"detector.{k}": v for k, v in over.items()}})]


@pytest.mark.slow
def test_train_detector_killed_and_resumed_equals_uninterrupted(shapes, tmp_path):
    out = tmp_path / "det_killed"
    argv = _det_argv(shapes, out)
    kill_when("pipelines.train_detector", argv, lambda: any(out.glob("ckpt_*.pt")), seed=3)
    assert not (out / "final.pt").exists()
    ckpts = sorted(out.glob("ckpt_*.pt"))
    it = max(load_checkpoint(p)["iteration"] for p in ckpts)
    assert 2 <= it < DET["detector.iters"], it
    res = run_module("pipelines.train_detector", argv)
    assert_ok(res)
    assert json.loads(res.out.strip().splitlines()[-1])["iteration"] == DET["detector.iters"]
    assert_ok(run_entry("pipelines.train_detector", _det_argv(shapes, tmp_path / "det_ref")))
    a, b = load_checkpoint(out / "final.pt"), load_checkpoint(tmp_path / "det_ref" / "final.pt")
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    keys = ("iter", "loss", "loss_cls", "loss_box", "num_rois", "num_fg", "lr")
    assert [{k: h[k] for k in keys} for h in a["history"]] == [{k: h[k] for k in keys} for h in b["history"]]
    assert [h["iter"] for h in a["history"]] == list(range(1, DET["detector.iters"] + 1))


def test_train_detector_refuses_a_damaged_checkpoint(shapes, tmp_path):
    out = tmp_path / "det"
    assert_ok(run_entry("pipelines.train_detector", _det_argv(shapes, out, iters=4)))
    ck = out / "ckpt_4.pt"
    ck.write_bytes(ck.read_bytes()[:4096])  # e.g. a copy cut short (our own writes are atomic)
    res = run_entry("pipelines.train_detector", _det_argv(shapes, out, iters=6))  # resume towards 6
    assert_user_error(res, "ckpt_4.pt", "cannot read checkpoint")


# ------------------------------------------------------------------------------------------------ atomic writes
class _Boom:
    def __reduce__(self):
        raise OSError("disk full (simulated)")


def test_interrupted_write_never_replaces_the_file(tmp_path):
    from core.io import atomic_torch_save, write_json

    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"iteration": 2, "w": torch.ones(1000)}, path)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"iteration": 4, "w": torch.zeros(1000), "x": _Boom()}, path)
    assert load_checkpoint(path)["iteration"] == 2  # the old checkpoint, whole
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"a": object()})
    assert not (tmp_path / "m.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary files left behind
