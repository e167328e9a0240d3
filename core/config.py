"""Experiment configuration: typed dataclass defaults, YAML overrides, `--set a.b=value` overrides.

Defaults in code are the paper's values (DeepMask: Pinheiro et al. 2015 §3.4; Fast R-CNN: Girshick 2015 and its
official code). YAML files in `configs/` override a few of them. An unknown key or a value of the wrong type
raises `ConfigError` naming the full dotted key. The resolved config is written next to every output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class CocoSource:
    """A COCO instances json and the folder its `file_name`s are relative to."""

    ann: str = ""
    images: str = ""


@dataclass
class DataConfig:
    # The detector's dataset: a VOCdevkit `VOC2007` folder and its splits.
    voc: str = ""
    train_split: str = "trainval"
    test_split: str = "test"
    train_images: int = 0  # > 0: only the first N images of the train split (CPU-sized runs); 0 = all
    test_images: int = 0  # > 0: only the first N images of the test split
    # Built-in synthetic set (`pipelines.make_shapes`): generated into `synthetic_root` when `synthetic` is true
    # and it is missing; then `voc` defaults to `<synthetic_root>/VOC2007` and DeepMask trains on its COCO json.
    synthetic: bool = False
    synthetic_root: str = ""
    synthetic_trainval: int = 240
    synthetic_test: int = 80
    synthetic_size: int = 256
    synthetic_seed: int = 0


@dataclass
class SSConfig:
    """SelectiveSearch, fast mode (Uijlings et al. IJCV 2013; R-CNN's selective_search_boxes.m)."""

    backend: str = "skimage"  # skimage (paper's ranking) | opencv (contrib; small regions first)
    mode: str = "fast"  # fast (R-CNN/Fast R-CNN VOC07 proposals) | quality | single
    seed: int = 0  # seeds the ranking's random numbers: same image + seed -> same ranked list
    min_box: int = 20  # selective_search_boxes.m: boxes narrower or shorter than this are dropped
    top_n: int = 2000  # Fast R-CNN used ~2000 SelectiveSearch boxes per image
    workers: int = 1  # worker processes for proposal extraction (not part of the proposals' identity)


@dataclass
class RandomConfig:
    """Random boxes: the baseline proposer that shows what the proposals are worth (a detector fed these)."""

    top_n: int = 2000
    min_side: int = 16  # sides log-uniform from min_side to the image's side; centres uniform in the image
    seed: int = 0  # with the image's pixels: same image + seed -> same boxes


@dataclass
class DeepMaskConfig:
    """DeepMask (paper §3). Defaults are the paper's values (§3.4); the official code's choices are options."""

    # model (§3.1, §3.4)
    trunk: str = "vgg_a"  # vgg_a (paper) | efficientnet_lite0 (CPU runs on real images) | small (synthetic/tests)
    pretrained: str = ""  # '' random init | 'imagenet' (offline weights) | path to a state dict
    head: str = "lowrank"  # lowrank (DeepMask) | full (DeepMaskFull, Table 1: 56x56 outputs fully connected)
    seg_channels: int = 512  # 1x1 conv of the segmentation branch (official code: 128)
    lowrank_dim: int = 512
    mask_size: int = 56  # h^o = w^o of eq. (1); bilinearly upsampled (fixed) to patch_size
    patch_size: int = 224  # input patch (multiple of 16)
    object_size: int = 128  # max side of a canonical positive in the patch
    score_hidden: list[int] = field(default_factory=lambda: [512, 1024])  # score FC layers (§3.4)
    dropout: float = 0.5
    # training data (§3.2, §3.4; official DataSampler for the filters)
    categories: list[str] = field(default_factory=list)  # empty = all; [pascal] = the 20 PASCAL classes (DeepMask20)
    train_sets: list[CocoSource] = field(default_factory=list)
    val_sets: list[CocoSource] = field(default_factory=list)  # empty: hold out val_fraction of the train images
    val_fraction: float = 0.05
    pos_shift: float = 16.0  # positive jitter: +-16 px shift (patch pixels) ...
    pos_scale: float = 0.25  # ... scale 2^(+-1/4) ...
    flip: bool = True  # ... and horizontal flip
    neg_shift: float = 32.0  # negatives: >= +-32 px (patch pixels) ...
    neg_scale: float = 1.0  # ... or 2^(+-1) in scale from every canonical positive
    neg_scale_min: float = -2.5  # log2 range of negative patch scales: the inference scales +- one step
    neg_scale_max: float = 1.5
    min_area: float = 100.0  # objects skipped as positives: crowd, area < 100 or box side < 5 (official code)
    min_side: float = 5.0
    pad_color: str = "mean"  # patch area outside the image: 'mean' (trunk mean colour) | 'grey' (0.5, official)
    batch_mode: str = "alternate"  # alternate mask / score batches (§3.2) | joint (1:1 batch, both losses)
    image_cache: int = 64  # decoded images (+ masks) cached per loader worker
    # training (§3.4)
    iters: int = 100000
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    lr_steps: list[int] = field(default_factory=list)  # iterations where lr *= gamma (paper: constant lr)
    gamma: float = 0.1
    # torchrun (core/distributed.py): 'none' keeps lr whatever the number of processes; 'linear' multiplies it by
    # the world size (the global batch is world_size x batch_size)
    lr_scaling: str = "none"
    score_weight: float = 1.0 / 32  # lambda of eq. (1)
    workers: int = 2
    val_every: int = 1000  # iterations between validations (0 = only at the end)
    val_batches: int = 10  # fixed, seeded held-out batches (batch_size patches each, 1:1 pos/neg)
    checkpoint_every: int = 1000
    # full-scene inference (§3.3, §3.4)
    scale_min: float = -2.0  # log2 of the smallest scale
    scale_max: float = 1.0
    scale_step: float = 0.5
    zoom: bool = False  # DeepMaskZoom: one extra scale 2^(scale_max + scale_step), for small objects
    mask_threshold: float = 0.2  # .2 COCO, .1 PASCAL
    top_n: int = 2000
    nms: float = 0.0  # 0 = no NMS (official code); else IoU threshold of box NMS over the pasted masks
    infer_pad: float = 0.5  # image padded by infer_pad * patch_size (scaled px) per side (official: 80 of 160)
    max_image_side: int = 1024  # longer side above this: image downscaled first (COCO/VOC are <= 640); 0 = no cap
    scale_batch: bool = False  # all scales in one trunk pass (mosaic, §4 "Speed"): same proposals, more memory; a
    # GPU saving in the paper, ~1.3x slower on the 2-core CPU measured (README "Speed")
    chunk: int = 128  # candidates pasted / RLE-encoded at a time (bounds memory)
    # number format of the trunk and heads at inference: float32 (exact), or bfloat16 / float16 (CPUs with AMX or
    # AVX512-BF16, GPUs): much faster matrix products, scores and masks within ~1% (ranking may change slightly)
    infer_dtype: str = "float32"


@dataclass
class DetectorConfig:
    """Fast R-CNN (Girshick, ICCV 2015), official recipe (rbgirshick/fast-rcnn, VGG16 on VOC07)."""

    # model (paper Sec. 2; fast-rcnn models/VGG16/train.prototxt)
    trunk: str = "vgg16"  # vgg16 (paper) | efficientnet_lite0 (CPU runs) | vgg_a | small (synthetic / tests)
    pretrained: str = "imagenet"  # '' random init | 'imagenet' (offline weights) | path to a state dict
    fc_dim: int = 4096  # fc6/fc7 width (VGG16: 4096 from the ImageNet classifier; smaller for light trunks)
    dropout: float = 0.5
    roi_size: int = 7  # RoI max pooling output (7x7 at spatial scale 1/16)
    freeze_early: bool = True  # conv1_1..conv2_2 frozen for VGG16 (core.backbones.freeze_early_layers)
    freeze_bn: bool = True  # keep BatchNorm of a *pretrained* trunk frozen (2 images/batch); ignored for random init
    # data (fast-rcnn config.py: TRAIN.SCALES, MAX_SIZE, USE_FLIPPED, USE_DIFF)
    scales: list[int] = field(default_factory=lambda: [600])  # shorter side at train (one drawn per image)
    max_size: int = 1000  # longer side at most (train and test)
    test_scale: int = 600
    flip: bool = True
    use_difficult: bool = False  # difficult gt excluded from training (USE_DIFF False)
    train_top: int = 2000  # proposals per image at train (0 = all in the store); --top overrides
    # minibatch (paper Sec. 2.3)
    ims_per_batch: int = 2
    batch_rois: int = 128  # RoIs per minibatch (64 per image)
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.1
    bbox_stds: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])  # py-faster-rcnn fixed stds
    # optimisation (fast-rcnn models/VGG16/solver.prototxt)
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    bias_lr_factor: float = 2.0  # biases: lr x2 (lr_mult 2) ...
    bias_weight_decay: float = 0.0  # ... and no weight decay (decay_mult 0)
    iters: int = 40000
    lr_steps: list[int] = field(default_factory=lambda: [30000])
    gamma: float = 0.1
    # torchrun (core/distributed.py): 'none' keeps lr whatever the number of processes; 'linear' multiplies it by
    # the world size (the global batch is world_size x ims_per_batch images)
    lr_scaling: str = "none"
    checkpoint_every: int = 10000  # SNAPSHOT_ITERS
    log_every: int = 20
    workers: int = 2  # DataLoader workers (decode + resize + RoI sampling)
    # test (fast-rcnn test.py; py-faster-rcnn thresholds)
    test_nms: float = 0.3
    score_thresh: float = 0.05
    max_dets: int = 100  # per image, all classes
    svd: bool = False  # truncated SVD of fc6/fc7 at test (paper Sec. 3.1)
    svd_fc6_rank: int = 1024
    svd_fc7_rank: int = 256


@dataclass
class SweepConfig:
    methods: list[str] = field(default_factory=lambda: ["deepmask", "selective_search"])
    counts: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200, 300, 500, 1000, 2000])


@dataclass
class Config:
    name: str = "default"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    ss: SSConfig = field(default_factory=SSConfig)
    random: RandomConfig = field(default_factory=RandomConfig)
    deepmask: DeepMaskConfig = field(default_factory=DeepMaskConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# ----------------------------------------------------------------------------------------------- machinery
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`, converting where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-4 or 1e30, without a dot, as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'" + _suggest(k, names))
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _suggest(k, names) -> str:
    import difflib

    close = difflib.get_close_matches(str(k), sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Build a Config from a (possibly partial) mapping over the defaults."""
    if not isinstance(data or {}, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    cfg = _from_dict(Config, _merge(to_dict(Config()), data or {}))
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------- value ranges
# Numeric keys whose values outside these intervals are meaningless: refused here with the key named, instead of
# failing deep inside a stage with an unrelated exception (found by tests/test_fuzz.py) or allocating without bound.
# '(' / ')' exclude the end. Lists: every item. Floats are at most 1e30 (SGD keeps them as float32).
_BIG = 1e30
_RANGES = {
    "seed": "[0, 9.2e18]",
    "ss.seed": "[0, 4294967295]", "ss.workers": "[0, 1024]",
    "random.top_n": "[1, big]", "random.min_side": "[1, big]", "random.seed": "[0, 4294967295]",
    "deepmask.seg_channels": "[1, 8192]", "deepmask.lowrank_dim": "[1, 8192]", "deepmask.mask_size": "[1, 1024]",
    "deepmask.patch_size": "[16, 2048]", "deepmask.object_size": "(0, 2048]", "deepmask.score_hidden": "[1, 16384]",
    "deepmask.dropout": "[0, 1)", "deepmask.val_fraction": "[0, 1)", "deepmask.pos_shift": "[0, 10000]",
    "deepmask.pos_scale": "[0, 8]", "deepmask.neg_shift": "[0, 10000]", "deepmask.neg_scale": "[0, 8]",
    "deepmask.neg_scale_min": "[-16, 16]", "deepmask.neg_scale_max": "[-16, 16]", "deepmask.min_area": "[0, big]",
    "deepmask.min_side": "[0, big]", "deepmask.image_cache": "[0, 1000000]", "deepmask.iters": "[0, big]",
    "deepmask.batch_size": "[2, 65536]", "deepmask.lr": "(0, big]", "deepmask.momentum": "[0, 1)",
    "deepmask.weight_decay": "[0, big]", "deepmask.lr_steps": "[0, big]", "deepmask.gamma": "(0, big]",
    "deepmask.score_weight": "[0, big]", "deepmask.workers": "[0, 1024]", "deepmask.val_every": "[0, big]",
    "deepmask.val_batches": "[0, 1000000]", "deepmask.checkpoint_every": "[0, big]", "deepmask.scale_min": "[-16, 16]",
    "deepmask.scale_max": "[-16, 16]", "deepmask.scale_step": "(0, 16]", "deepmask.mask_threshold": "(0, 1)",
    "deepmask.top_n": "[1, big]", "deepmask.nms": "[0, 1]", "deepmask.infer_pad": "[0, 16]",
    "deepmask.max_image_side": "[0, big]", "deepmask.chunk": "[1, big]",
    "detector.fc_dim": "[1, 16384]", "detector.dropout": "[0, 1)", "detector.roi_size": "[1, 64]",
    "detector.scales": "[1, 100000]", "detector.max_size": "[1, 100000]", "detector.test_scale": "[1, 100000]",
    "detector.train_top": "[0, big]", "detector.ims_per_batch": "[1, 1024]", "detector.batch_rois": "[1, 1000000]",
    "detector.fg_fraction": "[0, 1]", "detector.fg_thresh": "[0, 1]", "detector.bg_thresh_hi": "[0, 1]",
    "detector.bg_thresh_lo": "[0, 1]", "detector.bbox_stds": "(0, big]", "detector.lr": "(0, big]",
    "detector.momentum": "[0, 1)", "detector.weight_decay": "[0, big]", "detector.bias_lr_factor": "[0, big]",
    "detector.bias_weight_decay": "[0, big]", "detector.iters": "[0, big]", "detector.lr_steps": "[0, big]",
    "detector.gamma": "(0, big]", "detector.checkpoint_every": "[0, big]", "detector.log_every": "[0, big]",
    "detector.workers": "[0, 1024]", "detector.test_nms": "[0, 1]", "detector.score_thresh": "[0, 1]",
    "detector.max_dets": "[0, big]", "detector.svd_fc6_rank": "[1, big]", "detector.svd_fc7_rank": "[1, big]",
    "sweep.counts": "[1, big]",
}


def _check_range(key: str, value, interval: str) -> None:
    lo_s, hi_s = (t.strip() for t in interval[1:-1].split(","))
    lo, hi = (_BIG if t == "big" else float(t) for t in (lo_s, hi_s))
    items = value if isinstance(value, list) else [value]
    for i, v in enumerate(items):
        ok = (v > lo if interval[0] == "(" else v >= lo) and (v < hi if interval[-1] == ")" else v <= hi)
        if not ok:
            k = f"{key}[{i}]" if isinstance(value, list) else key
            shown = interval.replace("big", f"{_BIG:g}")
            v = repr(v) if len(repr(v)) <= 24 else f"{float(v):.4g}"
            raise ConfigError(f"config key '{k}': {v} is out of range (expected a value in {shown})")


def validate(cfg: Config) -> None:
    """ConfigError naming the key for a value outside its range (see _RANGES) or inconsistent pairs."""
    for key, interval in _RANGES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        _check_range(key, node, interval)
    d, dm = cfg.detector, cfg.deepmask
    if d.bg_thresh_lo > d.bg_thresh_hi:
        raise ConfigError(f"config keys 'detector.bg_thresh_lo' ({d.bg_thresh_lo}) > 'detector.bg_thresh_hi' "
                          f"({d.bg_thresh_hi}): no background RoI could be sampled")
    if len(d.bbox_stds) != 4:
        raise ConfigError(f"config key 'detector.bbox_stds': expected 4 values (x, y, w, h), got {d.bbox_stds}")
    for key, mode in (("deepmask.lr_scaling", dm.lr_scaling), ("detector.lr_scaling", d.lr_scaling)):
        if mode not in ("none", "linear"):
            raise ConfigError(f"config key '{key}': expected none or linear, got {mode!r}")
    if dm.scale_min > dm.scale_max:
        raise ConfigError(f"config keys 'deepmask.scale_min' ({dm.scale_min}) > 'deepmask.scale_max' "
                          f"({dm.scale_max})")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. detector.iters=1000")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set '{item}': malformed key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _merge(to_dict(Config()), data)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in --set {item}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{'.'.join(parts)}' in --set {item}" + _suggest(parts[-1], node))
        node[parts[-1]] = value
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    try:
        return from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def dump_config(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, dump_config(cfg))


def section_hash(obj) -> str:
    """Stable short hash of a (sub)config or any JSON-able value; used to skip finished stages."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
