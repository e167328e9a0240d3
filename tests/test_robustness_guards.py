"""Training guards and memory.

* A non-finite loss (or non-finite weights at a checkpoint) stops either training with one line naming the iteration
  and the setting (``detector.lr`` / ``deepmask.lr``), before the step: the last good checkpoint stays on disk,
  finite, and is named.
* Out of memory on one image (torch.OutOfMemoryError, an allocator RuntimeError, MemoryError) in proposal extraction,
  detector testing, detector training and ``pipelines.detect`` is reported with the image id and the setting that
  bounds the memory (deepmask.max_image_side, detector.max_size / test_scale, --max-side); other exceptions are not
  swallowed.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from core.datasets import VOCDataset
from core.io import load_checkpoint
from test_robustness_common import assert_ok, assert_user_error, make_voc, run_entry, scene
from test_robustness_inputs import SMALL_DET, box_store, sets

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    voc = make_voc(root, {f"g{k}": scene(k)[0] for k in range(3)}, split="val")
    ds = VOCDataset(voc, "val")
    store = box_store(root / "store", ds)
    return {"root": root, "voc": voc, "ds": ds, "store": store.path}


def _train_det(data, out, *extra):
    return run_entry("pipelines.train_detector", ["--proposals", data["store"], "--voc", data["voc"], "--split",
                                                  "val", "--out", out, "--no-progress", *sets(SMALL_DET), *extra])


def _finite(ckpt_path) -> bool:
    return all(v.isfinite().all() for v in load_checkpoint(ckpt_path)["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ divergence
def test_detector_divergence_keeps_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "det"
    # lr 0.01 for 2 iterations (checkpoint at 2), then x1e30: diverges within a few iterations
    res = _train_det(data, out, *sets(["detector.iters=8", "detector.checkpoint_every=1", "detector.lr_steps=[2]",
                                       "detector.gamma=1e30"]))
    line = assert_user_error(res, "training diverged", "detector.lr", "is kept")
    it = int(re.search(r"iteration (\d+)", line).group(1))
    assert 3 <= it <= 8
    kept = sorted(out.glob("ckpt_*.pt"))
    assert len(kept) == 1 and str(kept[0]) in line
    ck = load_checkpoint(kept[0])
    assert ck["iteration"] < it and _finite(kept[0])
    assert not (out / "final.pt").exists()


def test_detector_nan_loss_names_the_iteration(data, tmp_path, monkeypatch):
    import detector.train as dt

    real, calls = dt.detection_loss, []

    def loss_nan_at_3(*a, **k):
        calls.append(1)
        c, b = real(*a, **k)
        return (c * float("nan"), b) if len(calls) == 3 else (c, b)

    monkeypatch.setattr(dt, "detection_loss", loss_nan_at_3)
    out = tmp_path / "det"
    res = _train_det(data, out, *sets(["detector.iters=4", "detector.checkpoint_every=2"]))
    line = assert_user_error(res, "diverged at iteration 3", "loss nan", "detector.lr", "ckpt_2.pt")
    assert "g" in line  # the images of the batch are named
    assert load_checkpoint(out / "ckpt_2.pt")["iteration"] == 2 and _finite(out / "ckpt_2.pt")


def _shapes_coco(shapes):
    return (f"deepmask.train_sets=[{{ann: '{shapes / 'annotations/instances_trainval.json'}', "
            f"images: '{shapes / 'VOC2007/JPEGImages'}'}}]")


DM = ["deepmask.trunk=small", "deepmask.patch_size=48", "deepmask.object_size=24", "deepmask.mask_size=8",
      "deepmask.seg_channels=8", "deepmask.lowrank_dim=8", "deepmask.score_hidden=[8, 8]", "deepmask.batch_size=4",
      "deepmask.pos_shift=4", "deepmask.neg_shift=8", "deepmask.workers=0", "deepmask.val_batches=1",
      "deepmask.val_every=0", "deepmask.checkpoint_every=2", "deepmask.val_fraction=0.34", "deepmask.min_area=20"]


def test_deepmask_divergence_keeps_last_good_checkpoint(tmp_path, tiny_data):
    out = tmp_path / "dm"
    res = run_entry("pipelines.train_proposer", ["--out", out, "--no-progress", "--set", _shapes_coco(tiny_data),
                                                 *sets(DM + ["deepmask.iters=12", "deepmask.lr=0.01",
                                                             "deepmask.lr_steps=[2]", "deepmask.gamma=1e30"])])
    line = assert_user_error(res, "deepmask training diverged", "deepmask.lr", "last.pt", "is kept")
    it = int(re.search(r"iteration (\d+)", line).group(1))
    ck = load_checkpoint(out / "last.pt")
    assert 2 <= ck["iteration"] < it and _finite(out / "last.pt")


def test_deepmask_nan_loss_names_the_iteration(tmp_path, monkeypatch, tiny_data):
    import proposals.deepmask.train as dmt

    real, calls = dmt.deepmask_loss, []

    def loss_inf_at_4(*a, **k):
        calls.append(1)
        loss, st = real(*a, **k)
        return (loss + float("inf"), st) if len(calls) == 4 else (loss, st)

    monkeypatch.setattr(dmt, "deepmask_loss", loss_inf_at_4)
    out = tmp_path / "dm"
    res = run_entry("pipelines.train_proposer", ["--out", out, "--no-progress", "--set", _shapes_coco(tiny_data),
                                                 *sets(DM + ["deepmask.iters=6"])])
    assert_user_error(res, "diverged at iteration 4", "loss inf", "deepmask.lr", str(out / "last.pt"))
    assert load_checkpoint(out / "last.pt")["iteration"] == 2


# ------------------------------------------------------------------------------------------------ out of memory
class _OOMProposer:
    """A DeepMask-like proposer (has .dm) that runs out of memory on wide images."""

    has_masks = False

    def __init__(self, exc):
        from core.config import load_config

        self.dm = load_config(None, ["deepmask.max_image_side=2048"]).deepmask
        self.exc = exc

    def __call__(self, image):
        if image.shape[1] > 100:
            raise self.exc
        return np.array([[0, 0, 5, 5]], np.float32), np.ones(1, np.float32), None


@pytest.mark.parametrize("exc, needle", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "deepmask.max_image_side (now 2048"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), "max_image_side"),
    (MemoryError(), "max_image_side"),
])
def test_extraction_out_of_memory_names_image_and_setting(tmp_path, monkeypatch, exc, needle):
    import proposals

    voc = make_voc(tmp_path, {"small": scene(0, 60, 80)[0], "huge": scene(1, 60, 160)[0]})
    monkeypatch.setattr(proposals, "build_proposer", lambda *a, **k: _OOMProposer(exc))
    res = run_entry("pipelines.propose", ["--voc", voc, "--split", "val", "--out", tmp_path / "st", "--no-progress"])
    assert_user_error(res, "image huge", "160x60 px", "out of memory", needle, "rerun to resume")


def test_extraction_selective_search_out_of_memory_and_other_errors(tmp_path, monkeypatch):
    from proposals import SelectiveSearchProposer

    voc = make_voc(tmp_path, {"a": scene(0)[0]})

    def boom(self, image):
        raise MemoryError()

    monkeypatch.setattr(SelectiveSearchProposer, "__call__", boom)
    res = run_entry("pipelines.propose", ["--voc", voc, "--split", "val", "--out", tmp_path / "st", "--no-progress"])
    assert_user_error(res, "image a", "out of memory", "downscale")

    def bug(self, image):  # a programming error is not dressed up as a user error
        raise ValueError("a bug")

    monkeypatch.setattr(SelectiveSearchProposer, "__call__", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_entry("pipelines.propose", ["--voc", voc, "--split", "val", "--out", tmp_path / "st2", "--no-progress"])


@pytest.fixture(scope="module")
def det_ckpt(data):
    out = data["root"] / "det"
    assert_ok(_train_det(data, out))
    return out / "final.pt"


def test_detector_test_out_of_memory_names_image_and_setting(data, det_ckpt, tmp_path, monkeypatch):
    import detector.test as dtest

    real = dtest.detect_image

    def oom_on_big(model, image, *a, **k):
        if image.shape[2] > 90:  # 'fine' is tested at 85x64 px, 'wide' at 128x43 (max_size)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(model, image, *a, **k)

    monkeypatch.setattr(dtest, "detect_image", oom_on_big)
    voc = make_voc(tmp_path, {"fine": scene(0)[0], "wide": scene(1, 40, 120)[0]})
    st = box_store(tmp_path / "st", VOCDataset(voc, "val"))
    res = run_entry("pipelines.test_detector", ["--checkpoint", det_ckpt, "--proposals", st.path, "--top", 2,
                                                "--voc", voc, "--split", "val", "--out", tmp_path / "res",
                                                "--no-progress"])
    assert_user_error(res, "image wide", "120x40 px", "out of memory", "detector.max_size (now 128)",
                      "detector.test_scale (now 64)")


def test_detector_train_out_of_memory_names_images_and_setting(data, tmp_path, monkeypatch):
    import detector.train as dt

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dt, "detection_loss", oom)
    res = _train_det(data, tmp_path / "det")
    assert_user_error(res, "iteration 1", "out of memory", "images ['g", "detector.max_size (now 128)")


def test_detect_out_of_memory_one_line_per_image(data, det_ckpt, tmp_path, monkeypatch):
    import detector.predict

    real = detector.predict.predict

    def oom_on_wide(model, image, proposals, dcfg):
        if image.shape[1] > 100:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, image, proposals, dcfg)

    monkeypatch.setattr(detector.predict, "predict", oom_on_wide)
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(scene(0)[0]).save(tmp_path / "in" / "ok.jpg")
    Image.fromarray(scene(1, 60, 140)[0]).save(tmp_path / "in" / "wide.jpg")
    res = run_entry("pipelines.detect", [tmp_path / "in", "--detector-checkpoint", det_ckpt, "--out",
                                         tmp_path / "out", "--top", 5])
    assert res.code == 2 and "Traceback" not in res.err, res
    lines = res.error_lines
    assert len(lines) == 2 and "wide.jpg: out of memory" in lines[0] and "--max-side" in lines[0], lines
    assert "1 of 2 images failed" in lines[1]
    assert (tmp_path / "out" / "ok.json").is_file() and not (tmp_path / "out" / "wide.json").exists()
