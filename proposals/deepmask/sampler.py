"""DeepMask training patches (paper §3.2 and §3.4) from any COCO-format instance-mask dataset.

Positives (label +1): a *canonical* positive has an object centred in the patch (centre of its box) with its
largest side equal to ``object_size`` (128) in a ``patch_size`` (224) patch. Each positive is jittered by a shift
of +-``pos_shift`` (16) patch pixels, a scale of 2^(+-``pos_scale``) (2^(+-1/4)) and a horizontal flip, applied to
patch and mask alike (one affine transform for both). The target mask holds only the *single* centred object.

Negatives (label -1): a random patch centre (uniform over the image) and a random scale (log-uniform over the scales
that make objects of ``neg_object_range`` image px canonical: by default the paper's inference range 64..512 px widened
by half an octave each way, i.e. 2^-2.5 .. 2^1.5 at object_size 128, so negatives cover every (position, scale)
inference looks at), rejected -- and drawn again -- while it is within
BOTH the shift tolerance (< ``neg_shift`` = 32 patch pixels in x and in y) and the scale tolerance (< 2^neg_scale =
2^1) of the canonical positive of ANY annotated object of the image (§3.4: "negative examples are any patches at
least +-32 pixels or 2^(+-1) in scale from any canonical positive example"). Crowd regions and objects too small to
be positives also count as objects here, so a patch centred on them is never trained as "no object". Distances are
measured in the negative patch's own pixels (what the network sees).

Which object a positive is (``positive_sampling``): ``official`` (the official DeepMask DataSampler: mask batches draw
a category uniformly, then one of its instances; score batches an image uniformly, then one of its objects),
``category`` (category, then instance, in every batch) or ``object`` (uniform over all objects: frequent classes
dominate).

Objects used as positives: not crowd, area >= ``min_area`` (100) and box sides >= ``min_side`` (5) (the official
DataSampler's filter). Patches that reach outside the image are padded with the trunk's mean colour (``pad_color:
mean``, i.e. zero after normalisation) or 0.5 grey (``grey``, the official code's choice).

Patch extraction is one ``cv2.warpAffine`` per patch (and per mask); when the patch downsamples the image the
region under the patch is first reduced with ``cv2.resize(INTER_AREA)`` (anti-aliasing, like the image pyramid of
full-scene inference in infer.py).

Batches (§3.2: "we alternate between backpropagating through the segmentation branch and scoring branch ... for the
scoring branch, the data is sampled such that the model is trained with an equal number of positive and negative
samples"): with ``batch_mode: alternate`` even batches are *mask* batches (all positives, only the segmentation
loss), odd batches *score* batches (half positives, half negatives, only the score loss); ``joint`` makes every
batch 1:1 and uses both loss terms (mask term on its positives only).

Determinism and exact resumption: batch ``t`` is drawn from ``np.random.default_rng([seed, t])`` alone -- the
sampler is counter-based and has no other state -- so the stream is the same for any number of loader workers,
and resuming at iteration ``t`` resumes the data exactly (the "sampler RNG state" is just ``(seed, t)``).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from core.errors import ConfigError, DataError

from .sources import SourceShares, load_records, split_holdout  # noqa: F401  (load_records, split_holdout: also from here)

log = logging.getLogger(__name__)

__all__ = ["SamplerParams", "PatchSampler", "PatchStream", "warp_patch", "load_records", "split_holdout"]


@dataclass
class SamplerParams:
    patch_size: int = 224
    object_size: int = 128
    pos_shift: float = 16.0
    pos_scale: float = 0.25
    flip: bool = True
    neg_shift: float = 32.0
    neg_scale: float = 1.0
    neg_scale_min: float = -2.5  # log2 scales, from the config's neg_object_range and object_size
    neg_scale_max: float = 1.5
    positive_sampling: str = "official"
    min_area: float = 100.0
    min_side: float = 5.0
    batch_size: int = 32
    batch_mode: str = "alternate"
    pad_rgb: tuple = (124.0, 116.0, 104.0)
    image_cache: int = 64
    max_tries: int = 50

    @classmethod
    def from_config(cls, dm, pad_rgb) -> "SamplerParams":
        if dm.batch_mode not in ("alternate", "joint"):
            raise ConfigError(f"config key 'deepmask.batch_mode': '{dm.batch_mode}' (choose alternate or joint)")
        if dm.batch_size < 2:
            raise ConfigError("config key 'deepmask.batch_size': at least 2 (score batches are 1:1 pos/neg)")
        if dm.object_size <= 0 or dm.object_size > dm.patch_size:
            raise ConfigError(f"config key 'deepmask.object_size': {dm.object_size} must be in (0, patch_size]")
        lo, hi = (float(v) for v in dm.neg_object_range)
        if not 0 < lo <= hi:
            raise ConfigError(f"config key 'deepmask.neg_object_range': expected 0 < smallest <= largest, got "
                              f"{dm.neg_object_range}")
        if dm.positive_sampling not in ("official", "category", "object"):
            raise ConfigError(f"config key 'deepmask.positive_sampling': '{dm.positive_sampling}' (choose official, "
                              "category or object)")
        return cls(patch_size=dm.patch_size, object_size=dm.object_size, pos_shift=dm.pos_shift,
                   pos_scale=dm.pos_scale, flip=dm.flip, neg_shift=dm.neg_shift, neg_scale=dm.neg_scale,
                   neg_scale_min=math.log2(dm.object_size / hi), neg_scale_max=math.log2(dm.object_size / lo),
                   positive_sampling=dm.positive_sampling, min_area=dm.min_area,
                   min_side=dm.min_side, batch_size=dm.batch_size, batch_mode=dm.batch_mode,
                   pad_rgb=tuple(float(v) for v in pad_rgb), image_cache=dm.image_cache)


def pad_rgb_for(pad_color: str, trunk_mean) -> tuple:
    """Fill colour (0..255 RGB floats) of patch areas outside the image: 'mean' or 'grey'."""
    if pad_color == "mean":
        return tuple(255.0 * float(m) for m in trunk_mean)
    if pad_color == "grey":
        return (127.5, 127.5, 127.5)  # official code: 0.5 grey
    raise ConfigError(f"config key 'deepmask.pad_color': '{pad_color}' (choose mean or grey)")


# ------------------------------------------------------------------------------------------------ warping
def warp_patch(src: np.ndarray, cx: float, cy: float, s: float, flip: bool, size: int, border,
               interp: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The ``size`` x ``size`` patch centred on image point (cx, cy) at scale ``s`` (patch px per image px),
    mirrored left-right when ``flip``. Continuous coordinates: pixel i covers [i, i+1). One affine warp (plus an
    area-averaging reduction of the covered region first when s < 1); outside the image: ``border``."""
    h, w = src.shape[:2]
    x0 = y0 = 0.0
    sx = sy = 1.0
    if s < 1.0:  # anti-alias: reduce the region under the patch by ~s with area averaging, warp the rest
        half = size / (2.0 * s) + 2.0
        xa, xb = max(0, int(math.floor(cx - half))), min(w, int(math.ceil(cx + half)))
        ya, yb = max(0, int(math.floor(cy - half))), min(h, int(math.ceil(cy + half)))
        if xb <= xa or yb <= ya:  # the patch lies entirely outside the image
            shape = (size, size) + src.shape[2:]
            out = np.empty(shape, src.dtype)
            out[...] = border if src.ndim == 3 else border[0] if isinstance(border, (tuple, list)) else border
            return out
        nw, nh = max(1, int(round((xb - xa) * s))), max(1, int(round((yb - ya) * s)))
        src = cv2.resize(np.ascontiguousarray(src[ya:yb, xa:xb]), (nw, nh), interpolation=cv2.INTER_AREA)
        x0, y0, sx, sy = float(xa), float(ya), nw / (xb - xa), nh / (yb - ya)
    a = -s if flip else s
    # patch coordinate p = a * (x - cx) + size/2 with x = x0 + x_r / sx (x_r: coordinate in `src`); cv2 indexes
    # pixel centres, so p_i + 0.5 = (a/sx) (r_i + 0.5) + a (x0 - cx) + size/2.
    ax, ay = a / sx, s / sy
    bx = 0.5 * ax + a * (x0 - cx) + size / 2.0 - 0.5
    by = 0.5 * ay + s * (y0 - cy) + size / 2.0 - 0.5
    m = np.array([[ax, 0.0, bx], [0.0, ay, by]], np.float64)
    if src.ndim == 2 and isinstance(border, (tuple, list)):
        border = border[0]
    return cv2.warpAffine(src, m, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


# ------------------------------------------------------------------------------------------------ records
# ------------------------------------------------------------------------------------------------ sampler
class PatchSampler:
    """Counter-based sampler of DeepMask training batches (see the module docstring)."""

    def __init__(self, records: list, params: SamplerParams, seed: int = 0, name: str = "train", shares=()):
        """``shares``: per source (``Record.source``), the fraction of positives and of negative images drawn from
        it (MaskSource.share); empty or all 0: uniform over all objects / images."""
        self.records = records
        self.p = params
        self.seed = int(seed)
        self.name = name
        pos = []
        self._centres, self._sizes = [], []
        for ri, r in enumerate(records):
            b = np.asarray(r.boxes, np.float32).reshape(-1, 4)
            wh = b[:, 2:] - b[:, :2]
            self._centres.append((b[:, :2] + b[:, 2:]) / 2.0)
            self._sizes.append(wh.max(axis=1) if len(b) else np.zeros(0, np.float32))
            crowd = np.asarray(r.iscrowd, bool).reshape(-1)
            valid = (~crowd) & (wh.min(axis=1) >= params.min_side) & (wh.prod(axis=1) >= params.min_area)
            if r.segmentations is None:
                valid[:] = False
            pos.extend((ri, int(j)) for j in np.flatnonzero(valid))
        if not records:
            raise DataError(f"deepmask {name} data: no images")
        if not pos:
            raise DataError(f"deepmask {name} data: no object usable as a positive (non-crowd, area >= "
                            f"{params.min_area:g}, sides >= {params.min_side:g}) in {len(records)} images")
        self.positives = np.array(pos, np.int64)
        # groups of positive indices for category-then-instance and image-then-object draws
        labels = np.array([int(records[ri].labels[j]) for ri, j in pos], np.int64)
        self._by_category = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self._by_image = [np.flatnonzero(self.positives[:, 0] == ri) for ri in np.unique(self.positives[:, 0])]
        self._cache: OrderedDict = OrderedDict()
        self._shared = SourceShares(records, self, shares) if any(v > 0 for v in shares) else None

    def __len__(self) -> int:
        return len(self.positives)

    # ------------------------------------------------------------------ data access (per-worker LRU cache)
    def _entry(self, ri: int) -> dict:
        e = self._cache.get(ri)
        if e is not None:
            self._cache.move_to_end(ri)
            return e
        from core.images import load_image

        r = self.records[ri]
        img = load_image(r.path)
        if img.shape[0] != r.height or img.shape[1] != r.width:
            raise DataError(f"{r.path}: image is {img.shape[1]}x{img.shape[0]} but its annotation (image id "
                            f"{r.image_id}) says {r.width}x{r.height}")
        e = {"image": img, "masks": {}}
        self._cache[ri] = e
        while len(self._cache) > max(1, self.p.image_cache):
            self._cache.popitem(last=False)
        return e

    def _mask(self, ri: int, j: int) -> np.ndarray:
        e = self._entry(ri)
        m = e["masks"].get(j)
        if m is None:
            from pycocotools import mask as mask_utils

            from core.datasets import segmentation_to_rle

            r = self.records[ri]
            rle = segmentation_to_rle(r.segmentations[j], r.height, r.width, r.image_id)
            m = mask_utils.decode(rle) * np.uint8(255)  # uint8 0/255: 4x less cache than float, same warp
            e["masks"][j] = m
        return m

    # ------------------------------------------------------------------ geometry
    def positive_params(self, rng: np.random.Generator, ri: int, j: int) -> tuple[float, float, float, bool]:
        """Jittered canonical positive of object j of image ri: (cx, cy, scale, flip)."""
        p = self.p
        c = self._centres[ri][j]
        s0 = p.object_size / max(float(self._sizes[ri][j]), 1e-6)  # max side -> object_size (§3.4)
        s = s0 * 2.0 ** rng.uniform(-p.pos_scale, p.pos_scale)
        d = rng.uniform(-p.pos_shift, p.pos_shift, size=2)  # shift in patch pixels
        flip = bool(p.flip and rng.random() < 0.5)
        # The patch centre moves by -d/s image px, so the object centre lands at size/2 + d (mirrored with flip).
        return float(c[0] - d[0] / s), float(c[1] - d[1] / s), float(s), flip

    def is_negative(self, ri: int, cx: float, cy: float, s: float) -> bool:
        """True when (cx, cy, s) is at least neg_shift px (in x or y, patch pixels) or 2^neg_scale in scale away
        from the canonical positive of every object of image ri."""
        sizes = self._sizes[ri]
        if len(sizes) == 0:
            return True
        p = self.p
        s_obj = p.object_size / np.maximum(sizes, 1e-6)
        near_scale = np.abs(np.log2(s / s_obj)) < p.neg_scale
        d = np.abs(self._centres[ri] - np.array([cx, cy], np.float32)).max(axis=1) * s
        near_pos = d < p.neg_shift
        return not bool(np.any(near_scale & near_pos))

    def negative_params(self, rng: np.random.Generator) -> tuple[int, float, float, float, bool]:
        """A random negative: (image index, cx, cy, scale, flip)."""
        p = self.p
        for _ in range(1000):
            ri = self._shared.image(rng) if self._shared else int(rng.integers(len(self.records)))
            r = self.records[ri]
            for _ in range(p.max_tries):
                cx, cy = rng.uniform(0, r.width), rng.uniform(0, r.height)
                s = 2.0 ** rng.uniform(p.neg_scale_min, p.neg_scale_max)
                if self.is_negative(ri, cx, cy, s):
                    return ri, float(cx), float(cy), float(s), bool(p.flip and rng.random() < 0.5)
        raise DataError(f"deepmask {self.name} data: could not draw a negative patch (every patch is near an object;"
                        f" check deepmask.neg_shift / neg_scale)")

    def draw_positive(self, rng: np.random.Generator, kind: str) -> tuple[int, int]:
        """(image index, object index) of a positive for a batch of `kind` (see ``positive_sampling``)."""
        mode = self.p.positive_sampling
        if mode == "official":
            mode = "image" if kind == "score" else "category"
        by_cat, by_img, objs = self._shared.groups(rng) if self._shared else (self._by_category, self._by_image, None)
        if mode == "category":
            group = by_cat[rng.integers(len(by_cat))]
            k = group[rng.integers(len(group))]
        elif mode == "image":
            group = by_img[rng.integers(len(by_img))]
            k = group[rng.integers(len(group))]
        else:
            k = objs[rng.integers(len(objs))] if objs is not None else rng.integers(len(self.positives))
        ri, j = self.positives[k]
        return int(ri), int(j)

    # ------------------------------------------------------------------ batches
    def kind(self, t: int) -> str:
        if self.p.batch_mode == "joint":
            return "joint"
        return "mask" if t % 2 == 0 else "score"

    def batch(self, t: int, kind: str | None = None) -> dict:
        """Batch number ``t`` (deterministic in (seed, t)). Returns tensors: images (B,P,P,3) uint8, masks
        (B,P,P) bool (all False for negatives), labels (B,) float +-1, params (B,5) float64 (image index, cx, cy,
        scale, flip), and kind ('mask' | 'score' | 'joint')."""
        kind = kind or self.kind(t)
        p = self.p
        rng = np.random.default_rng([self.seed, int(t)])
        bsz, size = p.batch_size, p.patch_size
        n_pos = bsz if kind == "mask" else bsz - bsz // 2
        images = np.empty((bsz, size, size, 3), np.uint8)
        masks = np.zeros((bsz, size, size), bool)
        labels = np.empty(bsz, np.float32)
        params = np.empty((bsz, 5), np.float64)
        for k in range(bsz):
            if k < n_pos:
                ri, j = self.draw_positive(rng, kind)
                cx, cy, s, flip = self.positive_params(rng, ri, j)
                obj_mask = self._mask(int(ri), int(j))
                masks[k] = warp_patch(obj_mask, cx, cy, s, flip, size, 0.0) >= 128  # bilinear value >= 0.5
                labels[k] = 1.0
            else:
                ri, cx, cy, s, flip = self.negative_params(rng)
                labels[k] = -1.0
            images[k] = warp_patch(self._entry(int(ri))["image"], cx, cy, s, flip, size, p.pad_rgb)
            params[k] = (ri, cx, cy, s, float(flip))
        return {"images": torch.from_numpy(images), "masks": torch.from_numpy(masks),
                "labels": torch.from_numpy(labels), "params": torch.from_numpy(params), "kind": kind, "index": t}


class PatchStream(IterableDataset):
    """Endless stream of batches start, start+1, ... for a torch DataLoader (``batch_size=None``).

    Worker w of W yields batches start + w, start + w + W, ...; the DataLoader returns worker outputs round-robin
    in order, so the main process receives exactly start, start+1, ... whatever the number of workers.

    Distributed (``rank`` of ``world`` processes, core/distributed.py): iteration t's global batch is the sampler's
    batches t*world .. t*world + world-1, all of iteration t's kind (mask / score alternate per iteration, §3.2);
    rank r takes batch t*world + r, i.e. every world-th batch of the one global stream. world=1: batch t, as
    before. The yielded ``index`` is the iteration t."""

    def __init__(self, sampler: PatchSampler, start: int = 0, rank: int = 0, world: int = 1):
        super().__init__()
        self.sampler = sampler
        self.start = int(start)
        self.rank, self.world = int(rank), int(world)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        # (torch already runs each worker on one thread. Do not call cv2.setNumThreads here: in a forked child of
        # a parent that has used OpenCV's thread pool it deadlocks.)
        t = self.start + wid
        while True:
            b = self.sampler.batch(t * self.world + self.rank, kind=self.sampler.kind(t))
            b["index"] = t
            yield b
            t += nw
