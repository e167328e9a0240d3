"""Checkpoints are data, not code: loading one never runs code.

A pickle that would call ``pathlib.Path.touch`` (or ``os.system``) when unpickled, saved with torch.save under the
names the project reads (``final.pt``, ``last.pt``, ``best.pt``, ``ckpt_<iter>.pt``, a ``pretrained:`` weight file),
is refused by every entry point and library call that reads a checkpoint: one ``error:`` line naming the file and
exit code 2 (CheckpointError in the library), and the sentinel file the payload would create never appears. The
project's own checkpoints load with plain ``torch.load(weights_only=True)``; one of an earlier version (numpy RNG
state inside) gets a message naming the converter, which rewrites it, and it then resumes exactly.
(pipelines.bench reads no checkpoint: it times models it builds itself.)
"""
from __future__ import annotations

import os
import pathlib
import random
import shutil

import numpy as np
import pytest
import torch

from core.config import load_config, save_config
from core.datasets import VOCDataset
from core.errors import CheckpointError
from core.io import atomic_torch_save, load_checkpoint
from test_deepmask_train import _cfg as dm_cfg, make_coco
from test_robustness_common import assert_ok, assert_user_error, make_voc, run_entry, scene
from test_robustness_inputs import SMALL_DET, box_store, sets

torch.set_num_threads(1)


class _Payload:
    """Unpickling this calls ``Path.touch(sentinel)`` (how='touch') or ``os.system('touch sentinel')``."""

    def __init__(self, sentinel, how="touch"):
        self.sentinel, self.how = pathlib.Path(sentinel), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.sentinel}'",)
        return pathlib.Path.touch, (self.sentinel,)


def plant(path, sentinel, base=None, how="touch", **save_kw):
    """A checkpoint at ``path``: ``base`` (default a minimal one) plus a code-running payload."""
    obj = dict(base if base is not None else {"model": {}, "iteration": 1})
    obj["payload"] = _Payload(sentinel, how)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **save_kw)
    return pathlib.Path(path)


def assert_refused(res, path, sentinel):
    line = assert_user_error(res, str(path), "refused", "nothing of it was run")
    assert not pathlib.Path(sentinel).exists()
    return line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-iteration DeepMask (last.pt, best.pt) and a 2-iteration Fast R-CNN (ckpt_2.pt, final.pt) on tiny data,
    with the configs and datasets to call the entry points on them."""
    root = tmp_path_factory.mktemp("ckpt_safety")
    src = make_coco(root)
    dm = dm_cfg(src, **{"deepmask.iters": 2})
    save_config(dm, root / "dm.yaml")
    assert_ok(run_entry("pipelines.train_proposer", ["--config", root / "dm.yaml", "--out", root / "dm",
                                                     "--no-progress"]))
    voc = make_voc(root, {f"t{k}": scene(k)[0] for k in range(2)}, split="val")
    ds = VOCDataset(voc, "val")
    store = box_store(root / "store", ds)
    det_args = ["--proposals", store.path, "--voc", voc, "--split", "val", "--no-progress", *sets(SMALL_DET)]
    assert_ok(run_entry("pipelines.train_detector", [*det_args, "--out", root / "det"]))
    return {"root": root, "src": src, "dm_cfg": dm, "dm_yaml": root / "dm.yaml", "dm": root / "dm", "voc": voc,
            "store": store.path, "det_args": det_args, "det": root / "det"}


# ------------------------------------------------------------------------------------------------ the payload
@pytest.mark.parametrize("how", ["touch", "system"])
def test_the_payload_runs_when_unpickled_in_full(tmp_path, how):
    """Self-check: the planted files really run code under the full unpickler (what the project used to do)."""
    sentinel = tmp_path / "SENTINEL"
    p = plant(tmp_path / "final.pt", sentinel, how=how)
    torch.load(p, weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("how", ["touch", "system"])
@pytest.mark.parametrize("legacy_format", [False, True])
def test_load_checkpoint_refuses_code(tmp_path, how, legacy_format):
    sentinel = tmp_path / "SENTINEL"
    p = plant(tmp_path / "final.pt", sentinel, how=how, _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: refused: not plain data") and "\n" not in msg
    assert ("posix.system" if how == "system" else "getattr") in msg  # (the legacy format: torch names the first)
    assert not sentinel.exists()


def test_corrupt_is_told_apart_from_refused(runs, tmp_path):
    cut = tmp_path / "final.pt"
    cut.write_bytes((runs["det"] / "final.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"final\.pt: cannot read checkpoint \(corrupt or truncated") as e:
        load_checkpoint(cut)
    assert "refused" not in str(e.value)


def test_saving_anything_but_plain_data_is_refused(tmp_path):
    p = tmp_path / "ckpt.pt"
    atomic_torch_save({"iteration": 1}, p)
    with pytest.raises(TypeError, match="weights_only=True"):
        atomic_torch_save({"iteration": 2, "rng": np.random.get_state()}, p)
    assert load_checkpoint(p)["iteration"] == 1  # the old file is kept
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------ entry points
def test_test_detector_refuses(runs, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    ck = load_checkpoint(runs["det"] / "final.pt")
    p = plant(tmp_path / "final.pt", sentinel, base=ck)  # a working detector, plus the payload
    res = run_entry("pipelines.test_detector", ["--checkpoint", p, "--proposals", runs["store"], "--top", 2,
                                                "--voc", runs["voc"], "--split", "val", "--out", tmp_path / "res",
                                                "--no-progress"])
    assert_refused(res, p, sentinel)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("planted", ["detector", "deepmask"])
def test_detect_run_refuses(runs, tmp_path, planted):
    sentinel = tmp_path / "SENTINEL"
    run = tmp_path / "run"
    save_config(load_config(None, SMALL_DET), run / "config.yaml")
    det, dm = run / "detector_deepmask" / "final.pt", run / "deepmask" / "best.pt"
    shutil.copytree(runs["det"], det.parent)
    shutil.copytree(runs["dm"], dm.parent)
    bad = det if planted == "detector" else dm
    plant(bad, sentinel, base=load_checkpoint(bad))
    img = tmp_path / "img.jpg"
    shutil.copy(next((runs["voc"] / "JPEGImages").glob("*.jpg")), img)
    res = run_entry("pipelines.detect", ["--run", run, img, "--out", tmp_path / "out"])
    assert_refused(res, bad, sentinel)


def test_propose_deepmask_refuses(runs, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    p = plant(tmp_path / "best.pt", sentinel, base=load_checkpoint(runs["dm"] / "best.pt"))
    res = run_entry("pipelines.propose", ["--voc", runs["voc"], "--split", "val", "--out", tmp_path / "st",
                                          "--method", "deepmask", "--checkpoint", p, "--no-progress"])
    assert_refused(res, p, sentinel)


def test_train_proposer_resume_refuses(runs, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    out = tmp_path / "dm"
    shutil.copytree(runs["dm"], out)
    p = plant(out / "last.pt", sentinel, base=load_checkpoint(out / "last.pt"))
    res = run_entry("pipelines.train_proposer", ["--config", runs["dm_yaml"], "--set", "deepmask.iters=4",
                                                 "--out", out, "--no-progress"])
    assert_refused(res, p, sentinel)


@pytest.mark.parametrize("name", ["ckpt_2.pt", "final.pt"])
def test_train_detector_resume_refuses(runs, tmp_path, name):
    sentinel = tmp_path / "SENTINEL"
    out = tmp_path / "det"
    shutil.copytree(runs["det"], out)
    if name != "final.pt":
        (out / "final.pt").unlink()
    p = plant(out / name, sentinel, base=load_checkpoint(out / name))
    res = run_entry("pipelines.train_detector", [*runs["det_args"], "--out", out, "--set", "detector.iters=3"])
    assert_refused(res, p, sentinel)


def test_convert_checkpoint_refuses_code(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    p = plant(tmp_path / "last.pt", sentinel, how="system")
    assert_refused(run_entry("pipelines.convert_checkpoint", [p]), p, sentinel)
    assert not (tmp_path / "last.pt.orig").exists()


def test_library_loaders_refuse(runs, tmp_path):
    from core.backbones import build_trunk
    from detector.model import load_detector
    from proposals.deepmask.train import load_deepmask, train_deepmask

    sentinel = tmp_path / "SENTINEL"
    det = plant(tmp_path / "final.pt", sentinel, base=load_checkpoint(runs["det"] / "final.pt"))
    dm = plant(tmp_path / "best.pt", sentinel, base=load_checkpoint(runs["dm"] / "best.pt"))
    trunk = plant(tmp_path / "trunk.pth", sentinel, base=build_trunk("small").state_dict())
    out = tmp_path / "dm_run"
    plant(out / "last.pt", sentinel, base=load_checkpoint(runs["dm"] / "last.pt"))
    calls = [(lambda: load_detector(det), det), (lambda: load_deepmask(dm), dm),
             (lambda: build_trunk("small", str(trunk)), trunk),
             (lambda: train_deepmask(runs["dm_cfg"], out, progress=False), out / "last.pt")]
    for call, path in calls:
        with pytest.raises(CheckpointError, match=f"{path}: refused"):
            call()
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------------ own checkpoints
def test_own_checkpoints_are_plain_data(runs):
    for p in (runs["dm"] / "last.pt", runs["dm"] / "best.pt", runs["det"] / "ckpt_2.pt", runs["det"] / "final.pt"):
        ck = torch.load(p, weights_only=True)  # the acceptance: torch's own safe loader, nothing allowlisted
        assert ck["iteration"] == 2, p
    rng = torch.load(runs["det"] / "ckpt_2.pt", weights_only=True)["rng"]
    assert isinstance(rng["numpy"]["state"]["key"], torch.Tensor) and isinstance(rng["python"]["state"], torch.Tensor)


def _legacy_rng(st: dict) -> dict:
    """A plain RNG state of core.distributed.rng_state in the form earlier versions saved (numpy / python tuples)."""
    n, py = st["numpy"], st["python"]
    return dict(st, numpy=(n["bit_generator"], n["state"]["key"].numpy().astype(np.uint32), n["state"]["pos"],
                           n["has_gauss"], n["gauss"]),
                python=(py["version"], tuple(py["state"].tolist()), py["gauss_next"]))


def test_rng_state_round_trips_exactly():
    from core.distributed import plain_rng_state, rng_state, set_rng_state

    np.random.normal()  # a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    st = rng_state()

    def draw():
        return np.random.rand(3).tolist(), np.random.normal(), random.random(), random.gauss(0, 1), torch.rand(2)

    a = draw()
    for form in (st, _legacy_rng(st), plain_rng_state(_legacy_rng(st))):
        set_rng_state(form)
        b = draw()
        assert a[:4] == b[:4] and torch.equal(a[4], b[4])


def test_old_checkpoint_is_named_converted_and_resumes_exactly(runs, tmp_path):
    from proposals.deepmask.train import train_deepmask

    out = tmp_path / "dm"
    shutil.copytree(runs["dm"], out)
    old = load_checkpoint(out / "last.pt")
    torch.save(dict(old, rng=_legacy_rng(old["rng"])), out / "last.pt")  # as an earlier version wrote it
    argv = ["--config", runs["dm_yaml"], "--set", "deepmask.iters=4", "--out", out, "--no-progress"]
    line = assert_user_error(run_entry("pipelines.train_proposer", argv), "last.pt", "refused", "numpy",
                             "python -m pipelines.convert_checkpoint")
    assert str(out / "last.pt") in line

    res = run_entry("pipelines.convert_checkpoint", [out / "last.pt"])
    assert_ok(res)
    assert "converted" in res.out and (out / "last.pt.orig").is_file()
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 2
    assert "nothing to do" in run_entry("pipelines.convert_checkpoint", [out / "last.pt"]).out  # idempotent

    assert_ok(run_entry("pipelines.train_proposer", argv))
    full = train_deepmask(load_config(str(runs["dm_yaml"]), ["deepmask.iters=4"]), tmp_path / "full", progress=False)
    a, b = load_checkpoint(out / "last.pt"), load_checkpoint(full["last"])
    assert a["iteration"] == b["iteration"] == 4
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k


def test_convert_to_another_file_and_rng_ranks(runs, tmp_path):
    from core.io import convert_checkpoint

    ck = load_checkpoint(runs["det"] / "ckpt_2.pt")
    legacy = dict(ck, rng=_legacy_rng(ck["rng"]), rng_ranks=[_legacy_rng(ck["rng"])] * 2,
                  extra={"mean": np.float32(0.5), "boxes": np.zeros((2, 4), np.float32)})
    torch.save(legacy, tmp_path / "ckpt_2.pt")
    res = convert_checkpoint(tmp_path / "ckpt_2.pt", tmp_path / "new" / "ckpt_2.pt")
    assert res["converted"] and res["kept"] is None
    new = torch.load(tmp_path / "new" / "ckpt_2.pt", weights_only=True)
    for st in (new["rng"], *new["rng_ranks"]):
        assert torch.equal(st["numpy"]["state"]["key"], ck["rng"]["numpy"]["state"]["key"])
        assert torch.equal(st["python"]["state"], ck["rng"]["python"]["state"])
    assert new["extra"]["mean"] == 0.5 and torch.equal(new["extra"]["boxes"], torch.zeros(2, 4))
    for k, v in ck["model"].items():
        assert torch.equal(new["model"][k], v), k


def test_convert_refuses_numpy_data_beyond_numbers(tmp_path):
    from core.io import convert_checkpoint

    torch.save({"model": {}, "names": np.array(["a", "b"])}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot convert: it holds more than numeric numpy arrays"):
        convert_checkpoint(tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # nothing written, nothing kept aside
