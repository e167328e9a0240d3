"""pipelines.bench: the --quick smoke run writes well-formed JSON (no timing thresholds: the machine is shared)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import UserError
from pipelines import bench_plan, bench_report, benchlib

REPO = Path(__file__).resolve().parents[1]


def _bench(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "pipelines.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    r = _bench("--quick", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_quick_run_writes_expected_keys_and_positive_medians(quick):
    doc, stdout = quick
    for k in ("argv", "host", "settings", "config", "results", "ratios", "checks", "errors", "load_avg_start"):
        assert k in doc
    assert doc["errors"] == {}
    assert set(doc["results"]) == set(benchlib.QUICK_SET)
    for name, r in doc["results"].items():
        assert r["median"] > 0 and r["p10"] <= r["median"] <= r["p90"], name
        assert r["n"] >= 1 and r["peak_rss_mb"] > 0 and r["torch_threads"] >= 1, name
        assert r["unit"] in ("s/image", "s", "patches/s", "images/s"), name
    assert doc["results"]["deepmask.small.batched"]["detail"]["scale_batch"] is True
    assert doc["results"]["frcnn_test.small.top2000"]["detail"]["proposals"] == 2000
    # the int8 head (detector.test_dtype=int8) beside the config's, with their ratios
    assert [doc["results"][f"frcnn_test.small.top{n}{q}"]["detail"]["head_dtype"] for n in (100, 2000)
            for q in ("", ".int8")] == ["float32" if not bench_plan.native_bf16("cpu") else "bfloat16", "int8"] * 2
    for r in ("top2000.int8 / frcnn_test.small.top100.int8", "top2000.int8 / frcnn_test.small.top2000"):
        assert doc["ratios"][f"frcnn_test.small.{r}"]["paired"] > 0
    # the training measurements time the trunk as the config trains it: 'small' trains from scratch, BN not frozen
    assert [doc["results"][f"train.{s}.small"]["detail"]["frozen_bn"] for s in ("deepmask", "frcnn")] == [False] * 2
    from core.backbones import default_frozen_bn  # what an ImageNet-initialised Lite0 (the real config) trains with
    assert [default_frozen_bn(t, w) for t, w in (("efficientnet_lite0", "imagenet"), ("efficientnet_lite0", ""),
                                                 ("small", "w.pt"), ("vgg16", "imagenet"))] == [True, False, False, False]
    ratio = doc["ratios"]["deepmask.small.batched / deepmask.small.per_scale"]
    assert ratio["median_ratio"] > 0 and ratio["paired"] > 0
    assert "ss.opencv / ss.skimage" in doc["ratios"]
    check = doc["checks"]["deepmask.small: batched == per_scale"]
    assert check["images"] == 2 and check["identical"] is True
    # the printed table names every measurement
    for name in doc["results"]:
        assert name in stdout


def test_spawn_isolation_and_only(tmp_path):
    out = tmp_path / "voc.json"
    r = _bench("--quick", "--only", "voc07_eval", "--isolation", "spawn", "--voc-images", "30", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["voc07_eval"]
    res = doc["results"]["voc07_eval"]
    assert res["median"] > 0 and res["peak_rss_mb"] > 0 and res["detail"]["images"] == 30
    assert res["detail"]["detections_total"] == 30 * 20 * 100


def test_bad_arguments_are_one_line_errors(tmp_path):
    r = _bench("--images", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = _bench("--only", "no_such_measurement")
    assert r.returncode == 2 and "no_such_measurement" in r.stderr


def test_plan_and_image_resolution(tmp_path, monkeypatch):
    names = benchlib.all_measurements()
    assert "deepmask.efficientnet_lite0.batched" in names and "frcnn_test.vgg16.top2000" in names
    opts = benchlib.BenchOptions(only=["deepmask.efficientnet_lite0.*", "ss"])
    assert benchlib.plan(opts) == ["deepmask.efficientnet_lite0.per_scale", "deepmask.efficientnet_lite0.batched",
                                   "deepmask.efficientnet_lite0.per_scale_bf16", "ss.skimage", "ss.opencv"]
    with pytest.raises(UserError):
        benchlib.plan(benchlib.BenchOptions(only=["nothing"]))
    # a full name is also a prefix of its variants; '=NAME' is that measurement alone
    assert benchlib.plan(benchlib.BenchOptions(only=["train.deepmask.efficientnet_lite0"])) == [
        "train.deepmask.efficientnet_lite0", "train.deepmask.efficientnet_lite0.bf16"]
    assert benchlib.plan(benchlib.BenchOptions(only=["=train.deepmask.efficientnet_lite0",
                                                     "=frcnn_test.small.top100"])) == [
        "frcnn_test.small.top100", "train.deepmask.efficientnet_lite0"]
    with pytest.raises(UserError):
        benchlib.plan(benchlib.BenchOptions(only=["=ss"]))  # not a measurement's whole name
    # the whole plan leaves the bfloat16 measurements out where the CPU emulates bfloat16 (--only keeps them)
    low = {"deepmask.efficientnet_lite0.per_scale_bf16", "train.deepmask.efficientnet_lite0.bf16",
           "train.frcnn.efficientnet_lite0.bf16"}
    for native in (True, False):
        monkeypatch.setattr(bench_plan, "native_bf16", lambda device, native=native: native)
        full = benchlib.plan(benchlib.BenchOptions())
        assert low <= set(names) and set(full) == (set(names) if native else set(names) - low)
        assert "deepmask.efficientnet_lite0.per_scale_bf16" in benchlib.plan(opts)
    monkeypatch.setattr(bench_plan, "native_bf16", lambda device: False)
    assert low & set(benchlib.plan(benchlib.BenchOptions(device="cuda"))) == low
    # int8 (a CPU-only head) is in the CPU plan, not in a GPU's
    int8 = {"frcnn_test.efficientnet_lite0.top100.int8", "frcnn_test.efficientnet_lite0.top2000.int8"}
    assert int8 <= set(benchlib.plan(benchlib.BenchOptions()))
    assert not int8 & set(benchlib.plan(benchlib.BenchOptions(device="cuda")))
    # a VOC layout with a split, and a plain folder
    voc = tmp_path / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i in ("a", "b", "c"):
        (voc / "JPEGImages" / f"{i}.jpg").write_bytes(b"x")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("b\nc\n")
    paths, desc = benchlib.resolve_images(f"{voc}:val", 20)
    assert [Path(p).name for p in paths] == ["b.jpg", "c.jpg"] and "val" in desc
    assert benchlib.resolve_images(str(voc), 1)[0] == paths[:1]  # split defaults to val
    paths, _ = benchlib.resolve_images(str(voc / "JPEGImages"), 2)
    assert [Path(p).name for p in paths] == ["a.jpg", "b.jpg"]
    with pytest.raises(UserError):
        benchlib.resolve_images(f"{voc}:test", 20)


def test_summaries_and_voc_inputs():
    s = benchlib.summarize([3.0, 1.0, 2.0], "s/image")
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n"] == 3 and s["p10"] < 2 < s["p90"]
    b = benchlib.random_boxes(375, 500, 1000, 0)
    assert b.shape == (1000, 4) and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert b[:, [0, 2]].min() >= 0 and b[:, 2].max() <= 500 and b[:, 3].max() <= 375
    records, dets, classes = benchlib.synthetic_voc_eval_inputs(5, 20, 10)
    assert len(records) == 5 and len(classes) == 20
    assert all(len(v[0]) == 10 for d in dets.values() for v in d.values())
    from detector.voc_eval import evaluate_detections

    m = evaluate_detections(records, dets, classes)["mAP"]
    assert 0 < m <= 1 and np.isfinite(m)


# --------------------------------------------------------------------------- optimisations measured by the bench
def test_pack_canvases_separates_and_covers():
    from proposals.deepmask.infer import pack_canvases

    sizes = [(61, 77), (48, 59), (38, 46), (31, 37), (26, 30), (23, 26), (20, 22)]
    where, (H, W), gaps = pack_canvases(sizes, gap=2)
    occ = np.zeros((H, W), np.int64)
    for (r, c), (h, w) in zip(where, sizes):
        assert r >= 0 and c >= 0 and r + h <= H and c + w <= W
        # the canvas grown by the gap on every side overlaps no other canvas
        assert occ[max(0, r - 2):r + h + 2, max(0, c - 2):c + w + 2].sum() == 0
        occ[r:r + h, c:c + w] += 1
    covered = np.zeros((H, W), bool)
    for r0, c0, r1, c1 in gaps:
        covered[r0:r1, c0:c1] = True
    np.testing.assert_array_equal(covered, occ == 0)
    assert H * W < 1.6 * sum(h * w for h, w in sizes)  # a reasonably tight mosaic


def test_fused_trunks_match():
    import torch

    from core.backbones import build_trunk, fuse_for_inference

    torch.manual_seed(0)
    for name in ("small", "efficientnet_lite0"):
        trunk = build_trunk(name)
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
                with torch.no_grad():
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
                    m.bias.normal_(0, 0.1)
        trunk.eval()
        fused = fuse_for_inference(trunk)
        assert not [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for shape in ((1, 3, 64, 96), (1, 3, 65, 99)):  # even sizes take the grown kernel, odd ones F.pad
            x = torch.randn(shape)
            with torch.no_grad():
                a, b = trunk(x), fused(x.contiguous(memory_format=torch.channels_last))
            assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


@pytest.mark.parametrize("trunk", ["small", "efficientnet_lite0"])
def test_batched_scales_give_identical_proposals(trunk):
    """scale_batch (all scales in one mosaic pass) == one scale at a time, exactly: boxes, scores and masks."""
    import torch

    from core.config import DeepMaskConfig
    from proposals.deepmask.infer import DeepMaskProposer
    from proposals.deepmask.model import build_deepmask

    torch.set_num_threads(1)
    # paper geometry (224-px patches: canvases of at least 14x14 cells; for maps of a few cells oneDNN may pick
    # kernels that sum in another order for another map size, which the mosaic cannot reproduce); tiny heads
    dm = DeepMaskConfig(trunk=trunk, mask_size=8, seg_channels=8, lowrank_dim=8, score_hidden=[8, 8],
                        object_range=[90.51, 256.0], scale_step=0.5, top_n=60, chunk=16, mask_threshold=0.5,
                        infer_dtype="float32")
    torch.manual_seed(0)
    model = build_deepmask(dm, pretrained=False)
    with torch.no_grad():  # non-zero biases and BN statistics: the gaps of the mosaic must not leak
        for m in model.trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.bias.normal_(0, 0.2)
    img = np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8)
    one = DeepMaskProposer(model, dm, "cpu")(img)
    import dataclasses

    batched = DeepMaskProposer(model, dataclasses.replace(dm, scale_batch=True), "cpu")(img)
    assert len(one[0]) > 10
    np.testing.assert_array_equal(one[0], batched[0])
    np.testing.assert_array_equal(one[1], batched[1])
    assert one[2] == batched[2]


def test_compare_close_counts_matched_top_boxes(tmp_path):
    """The bfloat16 check: the fraction of float32's top boxes that the bfloat16 run reproduces at IoU >= 0.9."""
    import pickle

    a = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.array([.9, .8], np.float32), [])]
    b = [(np.array([[0, 0, 10, 10.2], [50, 50, 60, 60]], np.float32), np.array([.9, .7], np.float32), [])]
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(a))
    (tmp_path / "b.pkl").write_bytes(pickle.dumps(b))
    res = bench_report.compare_close(tmp_path / "a.pkl", tmp_path / "b.pkl")
    assert res["matched_fraction"] == 0.5 and not res["identical"]
    assert bench_report.compare_close(tmp_path / "a.pkl", tmp_path / "a.pkl")["identical"]


def test_weights_time_the_trained_models_of_the_run(tiny_run, tiny_run_overrides, tmp_path):
    """--weights auto (the default) with the config of a finished run times its trained DeepMask and Fast R-CNN,
    exactly as pipelines.propose builds the proposer; --weights random keeps random heads; a bad folder is a
    one-line error."""
    import pickle

    import torch

    from core.config import load_config
    from core.images import load_image
    from detector.model import DetectorCheckpoint
    from proposals.deepmask.infer import build_deepmask_proposer
    from tiny_run import SHAPES

    sets = [a for s in tiny_run_overrides for a in ("--set", s)]
    only = "deepmask.small.per_scale,frcnn_test.small.top100"
    out, wd = tmp_path / "trained.json", tmp_path / "wd"
    # one thread in the bench's children and here: the same summation order, so the same scores to the bit
    r = _bench("--num-images", "2", "--threads", "1", "--config", str(SHAPES), *sets, "--weights", "auto",
               "--only", only, "--workdir", str(wd), "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    dm_ckpt, det_ckpt = tiny_run / "deepmask" / "best.pt", tiny_run / "detector_deepmask" / "final.pt"
    assert doc["weights"]["deepmask"] == {"path": str(dm_ckpt), "trunk": "small"}
    assert doc["results"]["deepmask.small.per_scale"]["detail"]["weights"] == str(dm_ckpt)
    det = doc["results"]["frcnn_test.small.top100"]["detail"]
    assert det["weights"] == str(det_ckpt)
    assert det["fc_dim"] == DetectorCheckpoint.read(det_ckpt).config().detector.fc_dim
    assert f"trained deepmask {dm_ckpt}" in r.stdout
    # the proposals timed are those of the run's proposer under the bench's settings
    cfg = load_config(str(SHAPES), benchlib.DEFAULT_OVERRIDES + tiny_run_overrides)
    prop = build_deepmask_proposer(cfg, dm_ckpt)
    outs = pickle.loads((wd / "deepmask.small.per_scale.outputs.pkl").read_bytes())
    paths = doc["settings"]["image_paths"]
    assert len(outs) == len(paths) >= 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mine = [prop(load_image(path)) for path in paths]
    finally:
        torch.set_num_threads(threads)
    for (boxes, scores, rles), (b, s, m) in zip(outs, mine):
        np.testing.assert_array_equal(boxes, b)
        np.testing.assert_array_equal(scores, s)
        assert rles == m
    # random heads on request (and --quick's default)
    r = _bench("--quick", "--config", str(SHAPES), *sets, "--only", "frcnn_test.small.top100",
               "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["weights"] == {} and "random head" in doc["results"]["frcnn_test.small.top100"]["detail"]["weights"]
    r = _bench("--weights", str(tmp_path / "no_run"), "--only", "voc07_eval")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "no_run" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a file that is not a DeepMask checkpoint: a one-line error naming it
    (tmp_path / "odd" / "deepmask").mkdir(parents=True)
    torch.save({"model": {}}, tmp_path / "odd" / "deepmask" / "best.pt")
    r = _bench("--weights", str(tmp_path / "odd"), "--only", "voc07_eval")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "best.pt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
