"""What the benchmark measures: the measurement names, their selection (``--only``), the images they run on, and
the spec each child process receives."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.images import image_files
from core.precision import native_bf16

DEEPMASK_TRUNKS = ("small", "efficientnet_lite0", "vgg_a")
FRCNN_TRUNKS = ("small", "efficientnet_lite0", "vgg16")
HEAVY_TRUNKS = ("vgg_a", "vgg16")  # timed on the first ``heavy_images`` images only
FRCNN_TOPS = (100, 2000)
# Fast R-CNN test with detector.test_dtype=int8 (fc6 / fc7 as oneDNN int8 products; CPU only): '<name>.int8'
INT8_FRCNN_TRUNKS = ("small", "efficientnet_lite0")
# DeepMask with deepmask.infer_dtype=bfloat16 (trunk and heads; AMX / AVX512-BF16 CPUs, GPUs), one scale at a time
LOW_PRECISION_MODES = ("per_scale_bf16",)

# The bench times the official code's cheaper segmentation head (1x1 conv to 128 channels before the low-rank
# layer, facebookresearch/deepmask's segmentation branch) unless --set deepmask.seg_channels=512 asks for the paper's.
DEFAULT_OVERRIDES = ["deepmask.seg_channels=128"]
# --quick: a smoke run that finishes in seconds (tiny images, few proposals, small heads).
QUICK_OVERRIDES = ["deepmask.top_n=50", "deepmask.seg_channels=16", "deepmask.lowrank_dim=32",
                   "deepmask.score_hidden=[32,32]", "deepmask.batch_size=4", "deepmask.max_image_side=256",
                   "deepmask.object_range=[181,256]", "detector.scales=[128]",
                   "detector.test_scale=128", "detector.max_size=192", "detector.fc_dim=128", "detector.batch_rois=16"]
QUICK_SET = ("deepmask.small.per_scale", "deepmask.small.batched", "ss.skimage", "ss.opencv",
             "frcnn_test.small.top100", "frcnn_test.small.top2000", "frcnn_test.small.top100.int8",
             "frcnn_test.small.top2000.int8", "train.deepmask.small", "train.frcnn.small", "voc07_eval")


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
    # trained models to time instead of random heads (benchlib.trained_weights): {"deepmask" | "detector":
    # {"path": checkpoint, "trunk": its trunk}}; a measurement of the same trunk uses it
    weights: dict = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


def all_measurements() -> list[str]:
    names = []
    for t in DEEPMASK_TRUNKS:
        names += [f"deepmask.{t}.per_scale", f"deepmask.{t}.batched"]
    names += [f"deepmask.efficientnet_lite0.{m}" for m in LOW_PRECISION_MODES]
    names += ["ss.skimage", "ss.opencv"]
    names += [f"frcnn_test.{t}.top{n}" for t in FRCNN_TRUNKS for n in FRCNN_TOPS]
    names += [f"frcnn_test.{t}.top{n}.int8" for t in INT8_FRCNN_TRUNKS for n in FRCNN_TOPS]
    names += [f"train.deepmask.{t}" for t in ("small", "efficientnet_lite0")]
    names += [f"train.frcnn.{t}" for t in FRCNN_TRUNKS]
    names += ["train.deepmask.efficientnet_lite0.bf16", "train.frcnn.efficientnet_lite0.bf16"]  # bfloat16 autocast
    names += ["voc07_eval", "deepmask_big.efficientnet_lite0.per_scale", "deepmask_big.efficientnet_lite0.batched"]
    return names


def _selected(name: str, patterns: list[str]) -> bool:
    """A pattern selects a measurement by glob, by name, or as a dotted prefix ('ss' -> ss.skimage, ss.opencv; a full
    name also selects the names that extend it, e.g. '<m>.top100' its '.int8'); '=NAME' selects that name alone."""
    for p in patterns:
        if p.startswith("="):
            if name == p[1:]:
                return True
        elif fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p.rstrip(".") + "."):
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
    names = list(QUICK_SET) if opts.quick else names
    skips = set(emulated_skips(opts))
    if opts.device != "cpu":  # int8 runs on a CPU only
        skips |= {n for n in names if n.endswith(".int8")}
    return [n for n in names if n not in skips]


def emulated_skips(opts: BenchOptions) -> list[str]:
    """The bfloat16 measurements the whole plan leaves out on a CPU without bfloat16 units: emulated there, 12-18x
    slower than float32 on an AVX2 AMD EPYC (README "Speed"), minutes per measurement for a setting nobody runs
    with (``auto`` picks float32); ``--only`` still times them."""
    if opts.only or opts.device != "cpu" or native_bf16("cpu"):
        return []
    return [n for n in all_measurements() if is_low_precision(n)]


def is_low_precision(name: str) -> bool:
    """A measurement in bfloat16 (DeepMask inference or training autocast)."""
    return name.endswith(".bf16") or any(name.endswith(f".{m}") for m in LOW_PRECISION_MODES)


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


def _checkpoint(opts: BenchOptions, stage: str, trunk: str) -> str | None:
    w = opts.weights.get(stage)
    return w["path"] if w and w["trunk"] == trunk else None


def spec_of(name: str, opts: BenchOptions, images: list[str], heavy: list[str], workdir: Path,
             train: dict) -> dict:
    base = {"name": name, "config": opts.config, "device": opts.device, "repeats": opts.repeats,
            "warmup": opts.warmup, "threads": opts.threads}
    parts = name.split(".")
    if parts[0] == "deepmask":
        trunk = parts[1]
        return {**base, "kind": "deepmask", "trunk": trunk, "batched": parts[2].startswith("batched"),
                "dtype": "bfloat16" if parts[2].endswith("_bf16") else "float32",
                "images": heavy if trunk in HEAVY_TRUNKS else images,
                "outputs": str(workdir / f"{name}.outputs.pkl"), "checkpoint": _checkpoint(opts, "deepmask", trunk)}
    if parts[0] == "deepmask_big":
        return {**base, "kind": "deepmask", "trunk": parts[1], "batched": parts[2] == "batched", "images": images[:1],
                "upscale": list(opts.big_size), "repeats": 1, "warmup": 0,
                "checkpoint": _checkpoint(opts, "deepmask", parts[1])}
    if parts[0] == "ss":
        return {**base, "kind": "ss", "backend": parts[1], "device": "cpu", "images": images}
    if parts[0] == "frcnn_test":
        trunk = parts[1]
        return {**base, "kind": "frcnn_test", "trunk": trunk, "top": int(parts[2][3:]),
                "test_dtype": "int8" if parts[3:] == ["int8"] else None,  # None: the config's detector.test_dtype
                "images": heavy if trunk in HEAVY_TRUNKS else images,
                "checkpoint": _checkpoint(opts, "detector", trunk)}
    if parts[0] == "train":
        iters = opts.train_iters if parts[2] not in HEAVY_TRUNKS else max(1, opts.train_iters // 2)
        return {**base, "kind": f"train_{parts[1]}", "trunk": parts[2], "iters": iters, **train,
                "train_dtype": "bfloat16" if parts[3:] == ["bf16"] else "float32"}
    if name == "voc07_eval":
        return {**base, "kind": "voc07", "device": "cpu", "voc_images": opts.voc_images,
                "voc_classes": opts.voc_classes, "voc_dets": opts.voc_dets, "repeats": min(opts.repeats, 3),
                "warmup": 0}
    raise UserError(f"unknown measurement {name!r}")
