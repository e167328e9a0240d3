"""End to end: the whole experiment on a tiny synthetic config (the session's tiny run), every artefact checked;
`python -m pipelines.run` again skips every stage; `python -m pipelines.detect` on the run's models. The run from
scratch in a subprocess, twice, is the slow variant."""
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from core.datasets import VOC_CLASSES
from core.shapes import SHAPE_CLASSES
from tiny_run import ROOT, SHAPES, tiny_overrides

pytestmark = pytest.mark.e2e


def _run(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def _sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def rerun(tiny_run, tiny_run_overrides, tmp_path_factory):
    """`python -m pipelines.run` with the tiny run's own config: every stage is found done."""
    p = _run(["pipelines.run", "--config", str(SHAPES), "--quiet", *_sets(tiny_run_overrides)],
             tmp_path_factory.mktemp("rerun"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_artefacts_are_well_formed(tiny_run, rerun):
    run, stdout = tiny_run, rerun.stdout
    for name in ("config.yaml", "figure5.png", "recall.png", "recall_iou.png", "sweep.json", "sweep.csv",
                 "recall.json", "deepmask/best.pt", "detector_deepmask/final.pt", "detector_selective_search/final.pt"):
        assert (run / name).is_file(), name
    for name in ("figure5.png", "recall.png", "recall_iou.png"):
        im = Image.open(run / name)
        assert im.size[0] > 300 and im.size[1] > 200
    summary = json.loads((run / "sweep.json").read_text())
    rows = [r for r in summary["rows"] if r["protocol"] == "fixed"]
    # the re-train protocol: one detector per method and seed trained with the top 10, tested with the top 10
    retrained = [r for r in summary["rows"] if r["protocol"] == "retrain"]
    assert {(r["method"], r["N"], r["train_N"]) for r in retrained} == {(m, 10, 10) for m in ("deepmask",
                                                                                              "selective_search")}
    for m in ("deepmask", "selective_search"):
        for d in (f"detector_{m}_top10", f"detector_{m}_top10_seed1"):
            assert (run / d / "final.pt").is_file()
    assert all(r["train_N"] == 2000 for r in rows)
    assert {(r["method"], r["N"]) for r in rows} == {(m, n) for m in ("deepmask", "selective_search")
                                                    for n in (10, 100)}
    for r in rows:
        assert 0.0 <= r["mAP"] <= 1.0
        assert set(SHAPE_CLASSES) <= set(r["ap"]) <= set(VOC_CLASSES)  # every synthetic class has its AP
        present = [v for v in r["ap"].values()]
        assert all(0.0 <= v <= 1.0 for v in present)
    # two detector seeds per method: per-seed rows, and mean +- spread per (method, N)
    assert summary["seeds"] == [0, 1] and len(summary["seed_rows"]) == 8 + 4
    for r in rows:
        per = [s["mAP"] for s in summary["seed_rows"]
               if (s["method"], s["N"], s["protocol"]) == (r["method"], r["N"], "fixed")]
        assert r["mAP_per_seed"] == per and abs(r["mAP"] - float(np.mean(per))) < 1e-4
        assert abs(r["mAP_std"] - float(np.std(per, ddof=1))) < 1e-4 and r["mAP_min"] == min(per)
    for m in ("deepmask", "selective_search"):
        assert (run / f"detector_{m}_seed1" / "final.pt").is_file()
    with open(run / "sweep.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 12 + 6 and {r["method"] for r in csv_rows} == {"deepmask", "selective_search"}
    assert sorted({r["seed"] for r in csv_rows}) == ["0", "1", "mean"]
    assert all(r["mAP_std"] != "" for r in csv_rows if r["seed"] == "mean")
    recall = json.loads((run / "recall.json").read_text())
    for m in ("deepmask", "selective_search"):
        ar = recall["box"][m]["AR"]
        assert len(ar) == len(recall["counts"]) and all(0 <= v <= 1 for v in ar)
        assert all(b >= a - 1e-9 for a, b in zip(ar, ar[1:])), "AR must not decrease with more proposals"
    assert "deepmask" in recall["segm"] and "selective_search" not in recall["segm"]
    for m in ("deepmask", "selective_search"):  # the localisation curves of recall_iou.png
        loc = recall["localization"][m]
        assert loc["AR"] == recall["box"][m]["AR"] and loc["iou"][-1] == 1.0
        assert set(loc["recall_vs_iou"]) == {"10", "100"}
    # per-N devkit result files of the sweep
    for m in ("deepmask", "selective_search"):
        files = list((run / "results" / m).rglob("comp4_det_test_*.txt"))
        assert len(files) >= 2 * 6
    # the proposal stores: ranked, inside the images, DeepMask with masks
    from core.store import ProposalStore

    dm = ProposalStore.open(run / "proposals" / "deepmask_test")
    assert dm.has_masks and len(dm.image_ids) == 4
    # the object sizes the inference scales covered, in image px (object_range [22.63, 128] at object_size 64)
    assert dm.meta["info"]["object_range_px"] == [22.6, 128.0] and len(dm.meta["info"]["scales_log2"]) == 6
    p = dm.get(dm.image_ids[0])
    assert len(p) > 0 and np.all(np.diff(p.scores) <= 1e-6)
    ss = ProposalStore.open(run / "proposals" / "selective_search_trainval")
    assert len(ss.image_ids) == 6 and not ss.has_masks
    assert "SelectiveSearch" in stdout and "DeepMask" in stdout


def test_rerun_skips_every_stage(rerun):
    assert rerun.stderr.count("skipped (done for this config)") == 15, rerun.stderr[-2000:]  # 1+4+2x2x2+sweep+report
    assert "running" not in rerun.stderr


def test_detect_on_run(tiny_run, tmp_path):
    run = tiny_run
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(imgs / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (60, 80), dtype=np.uint8)).save(imgs / "grey.png")
    rgba = rng.integers(0, 255, (70, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(imgs / "rgba.png")
    out = tmp_path / "out"
    p = _run(["pipelines.detect", "--run", str(run), str(imgs), "--out", str(out), "--show-masks",
              "--score-thresh", "0"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for stem, (h, w) in {"photo": (90, 140), "grey": (60, 80), "rgba": (70, 50)}.items():
        rec = json.loads((out / f"{stem}.json").read_text())
        assert (rec["width"], rec["height"]) == (w, h) and rec["method"] == "deepmask"
        for d in rec["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and 0 <= d["score"] <= 1
        assert Image.open(out / f"{stem}.png").size == (w, h)
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(imgs / "one.png")
    (imgs / "text.jpg").write_text("not an image")
    p = _run(["pipelines.detect", "--run", str(run), str(imgs / "one.png"), str(imgs / "text.jpg"),
              "--out", str(out), "--method", "selective_search"], tmp_path)
    assert p.returncode == 2
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert any("one.png" in e and "1x1" in e for e in errs) and any("text.jpg" in e for e in errs)
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_fresh_run_in_a_subprocess_then_rerun(tiny_run, tmp_path):
    """From nothing (its own synthetic set too) in a subprocess on one thread, as the session's in-process run:
    the same proposals, and a second run that skips every stage and is faster."""
    from tiny_run import store_digest

    sets = _sets(tiny_overrides(tmp_path / "runs"))
    t0 = time.time()
    p = _run(["pipelines.run", "--config", str(SHAPES), "--quiet", *sets], tmp_path, OMP_NUM_THREADS="1")
    assert p.returncode == 0, p.stderr[-3000:]
    first = time.time() - t0
    t0 = time.time()
    p2 = _run(["pipelines.run", "--config", str(SHAPES), "--quiet", *sets], tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stderr.count("skipped (done for this config)") == 15 and time.time() - t0 < first
    for d in sorted((tiny_run / "proposals").iterdir()):
        assert store_digest(tmp_path / "runs" / "tiny" / "proposals" / d.name) == store_digest(d), d.name
