"""Fast R-CNN end to end on a tiny synthetic set: exact resume, trained >> random, multi-N test, entry points."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import load_config
from core.datasets import VOCDataset
from core.io import load_checkpoint
from core.store import ProposalStore
from core.synthetic import generate
from detector.model import build_detector
from detector.test import test_detector as run_test_detector
from detector.train import TrainEntries, TrainStream, train_detector

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

SMALL_DET = ["detector.trunk=small", "detector.pretrained=", "detector.fc_dim=128", "detector.scales=[96]",
             "detector.test_scale=96", "detector.max_size=160", "detector.workers=0", "detector.log_every=1",
             "detector.lr=0.01", "detector.train_top=0"]


def make_store(path, dataset, n_random=60, seed=0, empty=()):
    """Proposals: jittered ground-truth boxes (high and medium IoU) + random boxes, ranked jitter first."""
    store = ProposalStore.create(path, method="jitter", params={"seed": seed, "n_random": n_random},
                                 dataset=dataset.name, split=dataset.split, image_ids=dataset.image_ids)
    for i, rec in enumerate(dataset):
        rng = np.random.default_rng([seed, i])
        if rec.image_id in empty:
            store.put(rec.image_id, np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
            continue
        boxes = []
        for b in rec.boxes:
            w, h = b[2] - b[0], b[3] - b[1]
            for s in (0.05, 0.1, 0.2, 0.3):
                boxes.append(b + rng.normal(0, s, 4) * np.array([w, h, w, h]))
        xy = rng.uniform(0, [rec.width, rec.height], (n_random, 2))
        wh = rng.uniform(8, [rec.width / 2, rec.height / 2], (n_random, 2))
        boxes = np.concatenate([np.array(boxes).reshape(-1, 4), np.concatenate([xy, xy + wh], 1)])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, rec.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, rec.height)
        store.put(rec.image_id, boxes.astype(np.float32), np.linspace(1, 0, len(boxes), dtype=np.float32))
    store.finalize()
    return store


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    # a set of its own: learning must be visible (trained far above random), which the tiny set's 6 images are too
    # few for
    generate(root / "shapes", trainval=16, test=4, size=96, seed=5, workers=1)
    voc = root / "shapes" / "VOC2007"
    train = VOCDataset(voc, "trainval")
    test = VOCDataset(voc, "test")
    return {"root": root, "voc": voc, "train": train, "test": test,
            "train_store": make_store(root / "store_trainval", train),
            "test_store": make_store(root / "store_test", test, empty=(test.image_ids[0],))}


def _cfg(shapes, *extra):
    return load_config(None, SMALL_DET + [f"data.voc={shapes['voc']}", *extra])


def test_stream_is_deterministic_and_covers_flips(shapes):
    cfg = _cfg(shapes)
    entries = TrainEntries(shapes["train"])
    s1 = TrainStream(entries, shapes["train_store"].path, None, cfg.detector, (0.5,) * 3, (0.25,) * 3, seed=3)
    s2 = TrainStream(entries, shapes["train_store"].path, None, cfg.detector, (0.5,) * 3, (0.25,) * 3, seed=3)
    n = s1.per_epoch
    assert n == 2 * len(entries)
    seen = {s1.entry_at(p) for p in range(n)}
    assert len(seen) == n  # each (image, flip) exactly once per epoch
    a, b = s1[n + 5], s2[n + 5]  # any position, any order, any instance -> same sample
    assert torch.equal(a["rois"], b["rois"]) and torch.equal(a["image"], b["image"])
    assert s1.entry_at(3) != s1.entry_at(n + 3) or s1.entry_at(4) != s1.entry_at(n + 4)  # reshuffled per epoch


def test_resume_continues_with_same_losses(shapes, tmp_path):
    cfg = _cfg(shapes, "detector.iters=6", "detector.checkpoint_every=3", "detector.lr_steps=[4]")
    straight = train_detector(cfg, shapes["train_store"].path, shapes["train"], tmp_path / "a", progress=False)
    assert straight["final"] and len(straight["losses"]) == 6
    first = train_detector(cfg, shapes["train_store"].path, shapes["train"], tmp_path / "b", stop_after=3,
                           progress=False)
    assert first["final"] is None and first["iteration"] == 3 and (tmp_path / "b" / "ckpt_3.pt").is_file()
    # resume in a fresh call, with a DataLoader worker this time: the data do not depend on the workers
    cfg_w = _cfg(shapes, "detector.iters=6", "detector.checkpoint_every=3", "detector.lr_steps=[4]",
                 "detector.workers=1")
    second = train_detector(cfg_w, shapes["train_store"].path, shapes["train"], tmp_path / "b", progress=False)
    assert second["final"] and [r["iter"] for r in second["losses"]] == [4, 5, 6]
    resumed = first["losses"] + second["losses"]
    for x, y in zip(straight["losses"], resumed):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)
        assert x["lr"] == y["lr"]
    assert straight["losses"][-1]["lr"] == pytest.approx(0.01 * 0.1)  # lr step at 4
    wa = load_checkpoint(tmp_path / "a" / "final.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "final.pt")["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), k
    # finished run: a second call is skipped
    again = train_detector(cfg, shapes["train_store"].path, shapes["train"], tmp_path / "a", progress=False)
    assert again["losses"] == [] and again["final"]
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "history.json").is_file()


def test_resume_refuses_other_config(shapes, tmp_path):
    from core.errors import CheckpointError

    cfg = _cfg(shapes, "detector.iters=4", "detector.checkpoint_every=2")
    train_detector(cfg, shapes["train_store"].path, shapes["train"], tmp_path, stop_after=2, progress=False)
    other = _cfg(shapes, "detector.iters=4", "detector.checkpoint_every=2", "detector.fg_fraction=0.5")
    with pytest.raises(CheckpointError, match="detector.fg_fraction"):
        train_detector(other, shapes["train_store"].path, shapes["train"], tmp_path, progress=False)
    # a checkpoint written before a config field existed still resumes when the field has its default value, and
    # one whose identity holds a test-time setting (as older versions wrote) resumes whatever that setting
    ck_path = tmp_path / "ckpt_2.pt"
    ck = load_checkpoint(ck_path)  # weights_only=True
    del ck["identity"]["detector"]["bias_weight_decay"]
    ck["identity"]["detector"]["score_thresh"] = 0.01  # older versions compared test-time settings too
    torch.save(ck, ck_path)
    res = train_detector(cfg, shapes["train_store"].path, shapes["train"], tmp_path, progress=False)
    assert res["final"] and [r["iter"] for r in res["losses"]] == [3, 4]


def test_trained_far_above_random_and_multi_top(shapes, tmp_path):
    cfg = _cfg(shapes, "detector.iters=300", "detector.checkpoint_every=1000", "detector.lr_steps=[240]",
               "detector.log_every=50")
    res = train_detector(cfg, shapes["train_store"].path, shapes["train"], tmp_path / "det", progress=False)
    tops = [8, 1000]
    # evaluate on the training images (the point is that learning works, with few iterations)
    trained = run_test_detector(res["final"], shapes["train_store"], shapes["train"], tops, tmp_path / "res",
                                progress=False)
    torch.manual_seed(0)
    untrained = build_detector(cfg.detector, len(shapes["train"].classes))
    torch.nn.init.normal_(untrained.cls_score.weight, 0.0, 1.0)  # random class scores (not all near 1/21)
    rand = run_test_detector(untrained, shapes["train_store"], shapes["train"], [1000], tmp_path / "rand", cfg=cfg,
                             progress=False)
    assert set(trained) == {8, 1000}
    # 300 iterations: mAP .40-.53 over seeds 0-2 (float rounding alone, e.g. channels-last weights, moves it that
    # much); an untrained head scores ~.1
    assert trained[1000]["mAP"] > 0.35, trained[1000]
    assert trained[1000]["mAP"] > rand[1000]["mAP"] + 0.3, (trained[1000]["mAP"], rand[1000]["mAP"])
    for n in tops:
        d = tmp_path / "res" / f"top{n}"
        assert (d / "comp4_det_trainval_car.txt").is_file() and (d / "detections.json").is_file()
    # one pass with several N equals separate passes (slicing the head output is exact)
    single = run_test_detector(res["final"], shapes["train_store"], shapes["train"], [8], tmp_path / "r8",
                               progress=False)
    assert single[8]["mAP"] == pytest.approx(trained[8]["mAP"], abs=1e-9)
    from detector.voc_results import read_result_file

    a = read_result_file(tmp_path / "r8" / "top8" / "comp4_det_trainval_car.txt")
    b = read_result_file(tmp_path / "res" / "top8" / "comp4_det_trainval_car.txt")
    # same detections up to float rounding (BLAS blocks a 8-row and a 1000-row matmul differently)
    assert a.image_ids == b.image_ids and len(a.image_ids) > 0
    assert np.allclose(a.scores, b.scores, atol=1e-5) and np.allclose(a.boxes, b.boxes, atol=0.11)
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(summary["mAP"]) == {"8", "1000"}


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


def test_entry_points(shapes, tmp_path, capsys):
    sets = sum([["--set", s] for s in SMALL_DET + ["detector.iters=4", "detector.checkpoint_every=2"]], [])
    out = tmp_path / "det"
    r = _run(["pipelines.train_detector", "--proposals", str(shapes["train_store"].path), "--voc", str(shapes["voc"]),
              "--split", "trainval", "--out", str(out), "--no-progress", *sets])
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout.strip().splitlines()[-1])["final"]
    assert Path(final).is_file() and (out / "config.yaml").is_file()
    # an image with zero proposals (the first test image) gets zero detections, no crash
    r = _run(["pipelines.test_detector", "--checkpoint", final, "--proposals", str(shapes["test_store"].path),
              "--top", "5,50", "--voc", str(shapes["voc"]), "--split", "test", "--out", str(tmp_path / "res"),
              "--no-progress", "--set", "detector.svd=true", "--set", "detector.svd_fc6_rank=32"])
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last["mAP"]) == {"5", "50"} and all(0.0 <= v <= 1.0 for v in last["mAP"].values())
    dets = json.loads((tmp_path / "res" / "top50" / "detections.json").read_text())
    assert not any(d["image_id"] == shapes["test"].image_ids[0] for d in dets)
    # user errors: one line, exit 2 (in-process through core.cli.run_main: faster than subprocesses)
    from core.cli import run_main
    from pipelines.test_detector import main

    def err(args):
        with pytest.raises(SystemExit) as e:
            run_main(main, args)
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error:")
        return lines[-1]

    base = ["--checkpoint", final, "--voc", str(shapes["voc"]), "--split", "test", "--out", str(tmp_path / "x")]
    assert "split" in err(base + ["--proposals", str(shapes["train_store"].path), "--top", "5"])
    assert "--top" in err(base + ["--proposals", str(shapes["test_store"].path), "--top", "5,x"])
    assert "nope.pt" in err(["--checkpoint", str(tmp_path / "nope.pt"), "--proposals", str(shapes["test_store"].path),
                             "--top", "5", "--out", str(tmp_path / "x")])
    # int8 fc6 / fc7 (detector.int8): the float32 head's detections, up to quantisation error (score_thresh 0: the
    # few-iteration detector's scores are all low)
    dets = {}
    for dtype in ("float32", "int8"):
        with pytest.raises(SystemExit) as e:
            run_main(main, base[:-1] + [str(tmp_path / dtype), "--proposals", str(shapes["test_store"].path),
                                        "--top", "50", "--no-progress", "--set", f"detector.test_dtype={dtype}",
                                        "--set", "detector.score_thresh=0"])
        assert e.value.code == 0
        dets[dtype] = {(d["image_id"], d["category_id"], tuple(round(v) for v in d["bbox"])): d["score"]
                       for d in json.loads((tmp_path / dtype / "top50" / "detections.json").read_text())}
    common = dets["float32"].keys() & dets["int8"].keys()
    assert len(dets["int8"]) == len(dets["float32"]) > 100 and len(common) >= 0.9 * len(dets["float32"])
    assert max(abs(dets["float32"][k] - dets["int8"][k]) for k in common) < 1e-3


def test_entry_point_trains_on_the_first_train_images(shapes, tmp_path):
    """`data.train_images: N` makes `pipelines.train_detector` train on the first N images of the split, as
    `pipelines.run` does, so a store computed for those N images (e.g. the run's own) is accepted."""
    first = VOCDataset(shapes["voc"], "trainval", max_images=6)
    store = make_store(tmp_path / "store6", first)
    sets = sum([["--set", s] for s in SMALL_DET + ["detector.iters=2", "data.train_images=6"]], [])
    r = _run(["pipelines.train_detector", "--proposals", str(store.path), "--voc", str(shapes["voc"]),
              "--split", "trainval", "--out", str(tmp_path / "det6"), "--no-progress", *sets])
    assert r.returncode == 0, r.stderr
    assert "on 6 images" in r.stderr
    r = _run(["pipelines.train_detector", "--proposals", str(store.path), "--voc", str(shapes["voc"]),
              "--split", "trainval", "--out", str(tmp_path / "det_all"), "--no-progress",
              *sum([["--set", s] for s in SMALL_DET + ["detector.iters=2"]], [])])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")


def test_difficult_boxes_are_ground_truth_as_in_fast_rcnn_unless_excluded(shapes):
    """detector.use_difficult: true (the default, the original fast-rcnn, whose pascal_voc.py loads every object)
    trains with difficult boxes; false drops them (py-faster-rcnn's USE_DIFF=False)."""
    from core.config import DetectorConfig

    assert DetectorConfig().use_difficult is True
    ds = shapes["train"]
    n_all = sum(len(r.boxes) for r in ds)
    n_diff = sum(int(np.asarray(r.difficult, bool).sum()) for r in ds)
    assert n_diff > 0  # the synthetic set marks tiny / mostly hidden objects difficult
    with_diff = TrainEntries(ds, use_difficult=True)
    without = TrainEntries(ds, use_difficult=False)
    assert sum(len(b) for _, _, b, _ in with_diff.items) == n_all
    assert sum(len(b) for _, _, b, _ in without.items) == n_all - n_diff
    paper = load_config(str(Path(__file__).resolve().parents[1] / "configs/voc07_paper.yaml"))
    assert paper.detector.use_difficult and paper.ss.top_n == 0 and paper.detector.train_top == 0
