"""Experiment configuration: typed dataclass defaults, YAML overrides, `--set a.b=value` overrides.

Defaults in code are the paper's values (DeepMask: Pinheiro et al. 2015 §3.4; Fast R-CNN: Girshick 2015 and its
official code). YAML files in `configs/` override a few of them. An unknown key or a value of the wrong type
raises `ConfigError` naming the full dotted key. The resolved config is written next to every output.

Longer than the project's ~400-line rule on purpose: every field of every section, with the stages it affects
and why it has its default, is in this one file (the generic parsing lives in core/config_parse.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_parse import check_range, from_mapping, hints, merge, parse_override, suggest
from .errors import ConfigError


# ----------------------------------------------------------------------------------------------- field metadata
# Stage identity has one source: every field says here, next to its default, what it affects and its valid range.
# Stage keys (pipelines/experiment.py), the resume checks of both trainings and range validation derive from it.
DM_TRAIN = "deepmask.train"  # what DeepMask learns (the checkpoint)
DM_INFER = "deepmask.infer"  # DeepMask's proposals from a given checkpoint
SS = "proposals.selective_search"  # SelectiveSearch's proposals
RANDOM = "proposals.random"  # the random-box baseline's proposals
DET_TRAIN = "detector.train"  # what Fast R-CNN learns
DET_TEST = "detector.test"  # Fast R-CNN's detections from a given checkpoint (the sweep tests)
SWEEP = "sweep"  # which detectors and N the sweep reports
TRAIN_SPLIT = "data.train_split"  # which images the detector's train split holds (every stage reading it)
TEST_SPLIT = "data.test_split"  # which images the test split holds
REPORT = "report"  # the HTML report (pipelines.report)
STAGE_TAGS = (DM_TRAIN, DM_INFER, SS, RANDOM, DET_TRAIN, DET_TEST, SWEEP, TRAIN_SPLIT, TEST_SPLIT, REPORT)


def opt(default, *affects: str, range: str | None = None, resume: bool = False, key_if_set: bool = False):
    """A config field: its default, the stages it `affects` (none: it changes no result, e.g. worker counts),
    its valid `range` ('[lo, hi]', '(' / ')' exclude the end, 'big' = 1e30; lists: every item), and `resume`: a
    training field whose change reruns the stage but lets it continue from its checkpoint (e.g. `iters`).
    `key_if_set`: left out of the stage keys while at its default (a field added later: older runs keep their keys)."""
    unknown = [a for a in affects if a not in STAGE_TAGS]
    assert not unknown, unknown
    meta = {"affects": tuple(affects), "range": range, "resume": resume, "key_if_set": key_if_set}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- sections
def _key_if_set(default):
    """A field left out of stage keys while it has its default (added later: older runs keep their keys)."""
    return field(default=default, metadata={"key_if_set": True})


@dataclass
class MaskSource:
    """One set of instance masks for DeepMask: a COCO instances json (`ann`) and the folder its `file_name`s are
    relative to (`images`); or a binary-mask dataset (core.binary_masks): a folder of `images` and `masks`, a folder
    of same-named PNG masks thresholded at 128, whose connected components of at least `min_area` of the image
    (`objects: components`) or whole foreground (`objects: whole`) are the objects; `max_images` > 0 keeps the first
    N images by name. `share` > 0 (training sets): the fraction of the positives, and of the images negatives are
    drawn from, that come from this set; the sets without a share split the rest by their sizes (0 everywhere:
    every object, and every image, equally likely whatever its set)."""

    ann: str = ""
    images: str = ""
    masks: str = _key_if_set("")
    objects: str = _key_if_set("components")
    min_area: float = _key_if_set(0.01)
    max_images: int = _key_if_set(0)
    share: float = _key_if_set(0.0)



_BOTH_SPLITS = (TRAIN_SPLIT, TEST_SPLIT)
# the synthetic set's parameters name its folder (runs/data/shapes-<hash>): they change every split and DeepMask's
# training data
_SYNTH = (TRAIN_SPLIT, TEST_SPLIT, DM_TRAIN)


@dataclass
class DataConfig:
    # The detector's dataset: a VOCdevkit `VOC2007` folder and its splits.
    voc: str = opt("", *_BOTH_SPLITS)
    train_split: str = opt("trainval", TRAIN_SPLIT)
    test_split: str = opt("test", TEST_SPLIT)
    # > 0: only the first N images of the train split (CPU-sized runs); 0 = all
    train_images: int = opt(0, TRAIN_SPLIT, range="[0, big]")
    test_images: int = opt(0, TEST_SPLIT, range="[0, big]")  # > 0: only the first N images of the test split
    # Built-in synthetic set (`pipelines.make_shapes`): generated into `synthetic_root` when `synthetic` is true
    # and it is missing; then `voc` defaults to `<synthetic_root>/VOC2007` and DeepMask trains on its COCO json.
    synthetic: bool = opt(False, *_SYNTH)
    synthetic_root: str = opt("", *_SYNTH)
    synthetic_trainval: int = opt(240, *_SYNTH, range="[1, 10000000]")
    synthetic_test: int = opt(80, *_SYNTH, range="[1, 10000000]")
    synthetic_size: int = opt(256, *_SYNTH, range="[32, 8192]")
    synthetic_seed: int = opt(0, *_SYNTH, range="[0, 4294967295]")


@dataclass
class SSConfig:
    """SelectiveSearch, fast mode (Uijlings et al. IJCV 2013; R-CNN's selective_search_boxes.m)."""

    backend: str = opt("skimage", SS)  # skimage (paper's ranking) | opencv (contrib; small regions first)
    mode: str = opt("fast", SS)  # fast (R-CNN/Fast R-CNN VOC07 proposals) | quality | single
    seed: int = opt(0, SS, range="[0, 4294967295]")  # seeds the ranking: same image + seed -> same ranked list
    min_box: int = opt(20, SS)  # selective_search_boxes.m: boxes narrower or shorter than this are dropped
    # at most this many boxes per image (0 = all: Fast R-CNN used every box, about 2k per VOC image)
    top_n: int = opt(2000, SS, range="[0, big]")
    workers: int = opt(1, range="[0, 1024]")  # worker processes for proposal extraction


@dataclass
class RandomConfig:
    """Random boxes: the baseline proposer that shows what the proposals are worth (a detector fed these)."""

    top_n: int = opt(2000, RANDOM, range="[1, big]")
    # sides log-uniform from min_side to the image's side; centres uniform in the image
    min_side: int = opt(16, RANDOM, range="[1, big]")
    seed: int = opt(0, RANDOM, range="[0, 4294967295]")  # with the image's pixels: same image + seed -> same boxes


@dataclass
class DeepMaskConfig:
    """DeepMask (paper §3). Defaults are the paper's values (§3.4); the official code's choices are options."""

    # model (§3.1, §3.4)
    trunk: str = opt("vgg_a", DM_TRAIN)  # vgg_a (paper) | efficientnet_lite0 (CPU runs on real images) | small
    pretrained: str = opt("", DM_TRAIN)  # '' random init | 'imagenet' (offline weights) | path to a state dict
    head: str = opt("lowrank", DM_TRAIN)  # lowrank (DeepMask) | full (DeepMaskFull, Table 1: 56x56 outputs fc)
    seg_channels: int = opt(512, DM_TRAIN, range="[1, 8192]")  # 1x1 conv of the segmentation branch (official: 128)
    lowrank_dim: int = opt(512, DM_TRAIN, range="[1, 8192]")
    # h^o = w^o of eq. (1); bilinearly upsampled (fixed) to patch_size
    mask_size: int = opt(56, DM_TRAIN, range="[1, 1024]")
    patch_size: int = opt(224, DM_TRAIN, range="[16, 2048]")  # input patch (multiple of 16)
    object_size: int = opt(128, DM_TRAIN, range="(0, 2048]")  # max side of a canonical positive in the patch
    score_hidden: list[int] = opt([512, 1024], DM_TRAIN, range="[1, 16384]")  # score FC layers (§3.4)
    dropout: float = opt(0.5, DM_TRAIN, range="[0, 1)")
    # training data (§3.2, §3.4; official DataSampler for the filters)
    # empty = all; [pascal] = the 20 PASCAL classes (DeepMask20)
    categories: list[str] = opt([], DM_TRAIN)
    train_sets: list[MaskSource] = opt([], DM_TRAIN)
    val_sets: list[MaskSource] = opt([], DM_TRAIN)  # empty: hold out val_fraction of the train images
    val_fraction: float = opt(0.05, DM_TRAIN, range="[0, 1)")
    pos_shift: float = opt(16.0, DM_TRAIN, range="[0, 10000]")  # positive jitter: +-16 px shift (patch pixels) ...
    pos_scale: float = opt(0.25, DM_TRAIN, range="[0, 8]")  # ... scale 2^(+-1/4) ...
    flip: bool = opt(True, DM_TRAIN)  # ... and horizontal flip
    neg_shift: float = opt(32.0, DM_TRAIN, range="[0, 10000]")  # negatives: >= +-32 px (patch pixels) ...
    neg_scale: float = opt(1.0, DM_TRAIN, range="[0, 8]")  # ... or 2^(+-1) in scale from every canonical positive
    # sizes (longer box side, image px) of the objects negatives are drawn around: a negative patch's scale is
    # log-uniform over the scales that make these sizes canonical (object_size in the patch), so the range stays the
    # same for any patch / object size. Default: the paper's inference range 64..512 widened by half an octave at
    # each end (2^-2.5 .. 2^1.5 at object_size 128), so negatives cover every scale inference looks at
    neg_object_range: list[float] = opt([45.254834, 724.077344], DM_TRAIN, range="(0, big]")
    # how positives are drawn: 'official' (the official code: mask batches a category uniformly, then one of its
    # instances; score batches an image uniformly, then one of its objects), 'category' (category then instance in
    # every batch) or 'object' (uniform over all objects)
    positive_sampling: str = opt("official", DM_TRAIN)
    # objects skipped as positives: crowd, area < 100 or box side < 5 (official code)
    min_area: float = opt(100.0, DM_TRAIN, range="[0, big]")
    min_side: float = opt(5.0, DM_TRAIN, range="[0, big]")
    # patch area outside the image: 'mean' (trunk mean colour) | 'grey' (0.5, official)
    pad_color: str = opt("mean", DM_TRAIN)
    batch_mode: str = opt("alternate", DM_TRAIN)  # alternate mask / score batches (§3.2) | joint (1:1, both losses)
    image_cache: int = opt(64, range="[0, 1000000]")  # decoded images (+ masks) cached per loader worker
    # training (§3.4)
    iters: int = opt(100000, DM_TRAIN, range="[0, big]", resume=True)
    # number format of the training forward pass: float32, or bfloat16 autocast (convolutions and matrix products in
    # bfloat16; weights, gradients, optimizer state and losses float32); auto: bfloat16 where the hardware multiplies
    # it natively (core.precision). float32 by default: bfloat16 training is an opt-in until it is shown to keep the
    # validation numbers (README "Speed")
    train_dtype: str = opt("float32", DM_TRAIN, key_if_set=True)
    batch_size: int = opt(32, DM_TRAIN, range="[2, 65536]")
    lr: float = opt(1e-3, DM_TRAIN, range="(0, big]")
    momentum: float = opt(0.9, DM_TRAIN, range="[0, 1)")
    weight_decay: float = opt(5e-5, DM_TRAIN, range="[0, big]")
    # iterations where lr *= gamma (paper: constant lr)
    lr_steps: list[int] = opt([], DM_TRAIN, range="[0, big]")
    gamma: float = opt(0.1, DM_TRAIN, range="(0, big]")
    # torchrun (core/distributed.py): 'none' keeps lr whatever the number of processes; 'linear' multiplies it by
    # the world size (the global batch is world_size x batch_size)
    lr_scaling: str = opt("none", DM_TRAIN)
    score_weight: float = opt(1.0 / 32, DM_TRAIN, range="[0, big]")  # lambda of eq. (1)
    workers: int = opt(2, range="[0, 1024]")
    # validation picks best.pt: iterations between validations (0 = only at the end), fixed seeded held-out batches
    # (batch_size patches each, 1:1 pos/neg), and the threshold of its mask IoU (a training setting of its own, so
    # that the inference mask_threshold never changes which checkpoint is best)
    val_every: int = opt(1000, DM_TRAIN, range="[0, big]", resume=True)
    val_batches: int = opt(10, DM_TRAIN, range="[0, 1000000]")
    val_mask_threshold: float = opt(0.2, DM_TRAIN, range="(0, 1)")
    checkpoint_every: int = opt(1000, range="[0, big]")
    # full-scene inference (§3.3, §3.4)
    # sizes (longer box side, image px) of the objects inference covers: image scales 2^s from the one that makes
    # the largest canonical (object_size / hi) up by scale_step until the smallest is covered (object_size / lo);
    # paper: objects 64..512 at object_size 128 = scales 2^-2 .. 2^1. Given in image pixels so that a smaller patch
    # cannot silently change the objects covered; the store's meta.json records the range actually covered
    object_range: list[float] = opt([64.0, 512.0], DM_INFER, range="(0, big]")
    scale_step: float = opt(0.5, DM_INFER, range="(0, 16]")
    zoom: bool = opt(False, DM_INFER)  # DeepMaskZoom: one extra, larger scale (objects scale_step smaller)
    mask_threshold: float = opt(0.2, DM_INFER, range="(0, 1)")  # .2 COCO, .1 PASCAL
    top_n: int = opt(2000, DM_INFER, range="[1, big]")
    # 0 = no NMS (official code); else IoU threshold of box NMS over the pasted masks
    nms: float = opt(0.0, DM_INFER, range="[0, 1]")
    # image padded by infer_pad * patch_size (scaled px) per side (official: 80 of 160)
    infer_pad: float = opt(0.5, DM_INFER, range="[0, 16]")
    # longer side above this: image downscaled first (COCO/VOC are <= 640); 0 = no cap
    max_image_side: int = opt(1024, DM_INFER, range="[0, big]")
    # all scales in one trunk pass (mosaic, §4 "Speed"): same proposals, more memory; a GPU saving in the paper,
    # ~1.3x slower on the 2-core CPU measured (README "Speed")
    scale_batch: bool = opt(False)
    chunk: int = opt(128, range="[1, big]")  # candidates pasted / RLE-encoded at a time (bounds memory)
    # number format of the trunk and heads at inference: auto (bfloat16 on CPUs with AMX or AVX512-BF16 and on
    # GPUs, float32 elsewhere: core.precision), float32 (exact), bfloat16, float16: bfloat16 gives much faster
    # matrix products, scores and masks within ~1% (ranking may change slightly). The store records the choice
    infer_dtype: str = opt("auto", DM_INFER)


_DET_BOTH = (DET_TRAIN, DET_TEST)


@dataclass
class DetectorConfig:
    """Fast R-CNN (Girshick, ICCV 2015), official recipe (rbgirshick/fast-rcnn, VGG16 on VOC07)."""

    # model (paper Sec. 2; fast-rcnn models/VGG16/train.prototxt)
    trunk: str = opt("vgg16", DET_TRAIN)  # vgg16 (paper) | efficientnet_lite0 (CPU runs) | vgg_a | small (tests)
    pretrained: str = opt("imagenet", DET_TRAIN)  # '' random init | 'imagenet' (offline weights) | path
    # fc6/fc7 width (VGG16: 4096 from the ImageNet classifier; smaller for light trunks)
    fc_dim: int = opt(4096, DET_TRAIN, range="[1, 16384]")
    dropout: float = opt(0.5, DET_TRAIN, range="[0, 1)")
    roi_size: int = opt(7, DET_TRAIN, range="[1, 64]")  # RoI max pooling output (7x7 at spatial scale 1/16)
    # not in the paper: > 0 puts a 1x1 convolution + ReLU to this many channels between the trunk and the RoI
    # pooling, so pooling and fc6 see a thinner map (a cheaper head at 2000 RoIs, after Light-Head R-CNN's thin
    # feature map, Li et al. 2017); 0 (default): the trunk's map, as the paper
    roi_channels: int = opt(0, DET_TRAIN, range="[0, 4096]", key_if_set=True)
    freeze_early: bool = opt(True, DET_TRAIN)  # conv1_1..conv2_2 frozen for VGG16 (core.backbones)
    # keep BatchNorm of a *pretrained* trunk frozen (2 images/batch); ignored for random init
    freeze_bn: bool = opt(True, DET_TRAIN)
    # data (fast-rcnn config.py: TRAIN.SCALES, MAX_SIZE, USE_FLIPPED)
    scales: list[int] = opt([600], DET_TRAIN, range="[1, 100000]")  # shorter side at train (one drawn per image)
    max_size: int = opt(1000, *_DET_BOTH, range="[1, 100000]")  # longer side at most (train and test)
    test_scale: int = opt(600, DET_TEST, range="[1, 100000]")
    flip: bool = opt(True, DET_TRAIN)
    # difficult gt as training ground truth: the original fast-rcnn trains with them (its pascal_voc.py loads every
    # object); excluding them is py-faster-rcnn's USE_DIFF=False. The VOC07 metric ignores them at test either way
    use_difficult: bool = opt(True, DET_TRAIN)
    # proposals per image at train (0 = all in the store); --top overrides
    train_top: int = opt(2000, DET_TRAIN, range="[0, big]")
    # minibatch (paper Sec. 2.3)
    ims_per_batch: int = opt(2, DET_TRAIN, range="[1, 1024]")
    batch_rois: int = opt(128, DET_TRAIN, range="[1, 1000000]")  # RoIs per minibatch (64 per image)
    fg_fraction: float = opt(0.25, DET_TRAIN, range="[0, 1]")
    fg_thresh: float = opt(0.5, DET_TRAIN, range="[0, 1]")
    bg_thresh_hi: float = opt(0.5, DET_TRAIN, range="[0, 1]")
    bg_thresh_lo: float = opt(0.1, DET_TRAIN, range="[0, 1]")
    # py-faster-rcnn fixed stds: targets normalised at train, deltas de-normalised at test
    bbox_stds: list[float] = opt([0.1, 0.1, 0.2, 0.2], *_DET_BOTH, range="(0, big]")
    # optimisation (fast-rcnn models/VGG16/solver.prototxt)
    lr: float = opt(0.001, DET_TRAIN, range="(0, big]")
    momentum: float = opt(0.9, DET_TRAIN, range="[0, 1)")
    weight_decay: float = opt(0.0005, DET_TRAIN, range="[0, big]")
    bias_lr_factor: float = opt(2.0, DET_TRAIN, range="[0, big]")  # biases: lr x2 (lr_mult 2) ...
    bias_weight_decay: float = opt(0.0, DET_TRAIN, range="[0, big]")  # ... and no weight decay (decay_mult 0)
    iters: int = opt(40000, DET_TRAIN, range="[0, big]", resume=True)
    train_dtype: str = opt("float32", DET_TRAIN, key_if_set=True)  # as deepmask.train_dtype
    lr_steps: list[int] = opt([30000], DET_TRAIN, range="[0, big]")
    gamma: float = opt(0.1, DET_TRAIN, range="(0, big]")
    # torchrun (core/distributed.py): 'none' keeps lr whatever the number of processes; 'linear' multiplies it by
    # the world size (the global batch is world_size x ims_per_batch images)
    lr_scaling: str = opt("none", DET_TRAIN)
    checkpoint_every: int = opt(10000, range="[0, big]")  # SNAPSHOT_ITERS
    log_every: int = opt(20, range="[0, big]")
    workers: int = opt(2, range="[0, 1024]")  # DataLoader workers (decode + resize + RoI sampling)
    # test (fast-rcnn test.py; py-faster-rcnn thresholds)
    test_nms: float = opt(0.3, DET_TEST, range="[0, 1]")
    score_thresh: float = opt(0.05, DET_TEST, range="[0, 1]")
    max_dets: int = opt(100, DET_TEST, range="[0, big]")  # per image, all classes
    # number format of the RoI head (fc6, fc7, classifier, regressor) at test, as deepmask.infer_dtype: auto is
    # bfloat16 where the hardware has it (core.precision); the trunk stays float32. 'int8' (CPU, not in the paper):
    # fc6 / fc7 as int8 products (detector.int8), for CPUs without bfloat16 units
    test_dtype: str = opt("auto", DET_TEST)
    svd: bool = opt(False, DET_TEST)  # truncated SVD of fc6/fc7 at test (paper Sec. 3.1)
    svd_fc6_rank: int = opt(1024, DET_TEST, range="[1, big]")
    svd_fc7_rank: int = opt(256, DET_TEST, range="[1, big]")


@dataclass
class SweepConfig:
    methods: list[str] = opt(["deepmask", "selective_search"], SWEEP)
    counts: list[int] = opt([10, 20, 50, 100, 200, 300, 500, 1000, 2000], SWEEP, range="[1, big]")
    # detector seeds: one Fast R-CNN per method and seed, the sweep reports mean and spread per N (empty: the
    # top-level seed alone). Each detector's own key holds its seed; this list says which detectors exist.
    seeds: list[int] = opt([], SWEEP, range="[0, 9.2e18]")
    # the 're-train' protocol (Fast R-CNN §5.5, which the paper's Figure 5 follows: "re-train and evaluate ... with
    # varying number of proposals"): for each N here, one more detector per method (and seed) trained with the top
    # N proposals and tested with them; the 'fixed' protocol (train with detector.train_top, test at every
    # sweep.counts) is always reported beside it. Empty: fixed only
    retrain_counts: list[int] = opt([], SWEEP, range="[1, big]")


@dataclass
class ReportConfig:
    """runs/NAME/report/index.html (pipelines.report), the run's last stage."""

    images: int = opt(0, REPORT, range="[0, big]")  # test images in the per-image viewer (0 = all)
    top_k: int = opt(100, REPORT, range="[1, 10000]")  # proposals per image and method the viewer's slider reaches


@dataclass
class Config:
    name: str = opt("default")
    out_dir: str = opt("runs")
    seed: int = opt(0, DM_TRAIN, DET_TRAIN, range="[0, 9.2e18]")  # DeepMask and (without sweep.seeds) detectors
    device: str = opt("cpu")  # where it runs; the numbers it gives are not part of any stage's identity
    data: DataConfig = field(default_factory=DataConfig)
    ss: SSConfig = field(default_factory=SSConfig)
    random: RandomConfig = field(default_factory=RandomConfig)
    deepmask: DeepMaskConfig = field(default_factory=DeepMaskConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def detector_seeds(self) -> list[int]:
        """The seeds of the detectors a run trains (sweep.seeds, or the top-level seed alone)."""
        return list(dict.fromkeys(self.sweep.seeds)) or [self.seed]


SECTIONS = ("data", "ss", "random", "deepmask", "detector", "sweep", "report")


def leaf_fields(cls=None, prefix: str = ""):
    """(dotted key, dataclasses.Field) of every field of the config with metadata, sections expanded."""
    cls = cls or Config
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and cls is Config:
            yield from leaf_fields(f.type if isinstance(f.type, type) else hints(cls)[f.name], f"{f.name}.")
        else:
            yield prefix + f.name, f


def field_info(key: str) -> dict:
    """The metadata (affects, range, resume) of a dotted key, e.g. 'deepmask.top_n'."""
    for k, f in leaf_fields():
        if k == key:
            return dict(f.metadata)
    raise ConfigError(f"unknown config key '{key}'")


def values_for(cfg, tag: str, section: str | None = None, resumable: bool = True) -> dict:
    """{dotted key: value} of the fields (of one `section`, or all) that affect `tag`; ``resumable=False`` leaves
    out the fields whose change a training may resume across (its checkpoint's identity)."""
    out = {}
    for key, f in leaf_fields():
        if tag not in f.metadata.get("affects", ()) or (section and not key.startswith(section + ".")):
            continue
        if not resumable and f.metadata.get("resume"):
            continue
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if f.metadata.get("key_if_set") and node == f.default:
            continue
        out[key] = _key_value(node)
    return out


def _key_value(v):
    """A value as a stage key holds it: dataclasses as dicts without their `key_if_set` fields at the default."""
    if isinstance(v, list):
        return [_key_value(x) for x in v]
    if not dataclasses.is_dataclass(v):
        return v
    return {f.name: _key_value(getattr(v, f.name)) for f in dataclasses.fields(v)
            if not (f.metadata.get("key_if_set") and getattr(v, f.name) == f.default)}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Build a Config from a (possibly partial) mapping over the defaults."""
    if not isinstance(data or {}, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    cfg = from_mapping(Config, merge(to_dict(Config()), data or {}))
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------- value ranges
# Values outside a field's range (its metadata) are refused here with the key named, instead of failing deep inside
# a stage with an unrelated exception (found by tests/test_fuzz.py) or allocating without bound.


def validate(cfg: Config) -> None:
    """ConfigError naming the key for a value outside its range (its field's metadata) or inconsistent pairs."""
    for key, f in leaf_fields():
        if f.metadata.get("range"):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            check_range(key, node, f.metadata["range"])
    d, dm = cfg.detector, cfg.deepmask
    if d.bg_thresh_lo > d.bg_thresh_hi:
        raise ConfigError(f"config keys 'detector.bg_thresh_lo' ({d.bg_thresh_lo}) > 'detector.bg_thresh_hi' "
                          f"({d.bg_thresh_hi}): no background RoI could be sampled")
    if len(d.bbox_stds) != 4:
        raise ConfigError(f"config key 'detector.bbox_stds': expected 4 values (x, y, w, h), got {d.bbox_stds}")
    for key, mode in (("deepmask.lr_scaling", dm.lr_scaling), ("detector.lr_scaling", d.lr_scaling)):
        if mode not in ("none", "linear"):
            raise ConfigError(f"config key '{key}': expected none or linear, got {mode!r}")
    for key in ("object_range", "neg_object_range"):
        lo_hi = getattr(dm, key)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            raise ConfigError(f"config key 'deepmask.{key}': expected [smallest, largest] object size in image "
                              f"pixels, got {lo_hi}")
    if dm.positive_sampling not in ("official", "category", "object"):
        raise ConfigError(f"config key 'deepmask.positive_sampling': expected official, category or object, got "
                          f"{dm.positive_sampling!r}")
    from .precision import CHOICES, TEST_CHOICES
    for key, v, choices in (("deepmask.infer_dtype", dm.infer_dtype, CHOICES),
                            ("deepmask.train_dtype", dm.train_dtype, CHOICES),
                            ("detector.test_dtype", d.test_dtype, TEST_CHOICES),
                            ("detector.train_dtype", d.train_dtype, CHOICES)):
        if v not in choices:
            raise ConfigError(f"config key '{key}': expected one of {', '.join(choices)}, got {v!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = merge(to_dict(Config()), data)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in --set {item}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{'.'.join(parts)}' in --set {item}" + suggest(parts[-1], node))
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
