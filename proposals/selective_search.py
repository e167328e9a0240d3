"""SelectiveSearch (Uijlings, van de Sande, Gevers, Smeulders, IJCV 2013), the proposal baseline of Fast R-CNN.

`selective_search(image)` reproduces the "fast" mode used for the VOC07 proposals of R-CNN / Fast R-CNN
(R-CNN's `selective_search_boxes.m` calling `Image2HierarchicalGrouping.m` of the SelectiveSearch release):

* colour spaces HSV and Lab (`Image2ColourSpace.m`: images quantised to uint8, Lab as the uint8 sRGB->Lab
  encoding L*255/100, a+128, b+128), Felzenszwalb-Huttenlocher segmentation (scikit-image) with k in {50, 100},
  sigma 0.8, min size k: 4 initial segmentations;
* hierarchical grouping of each with two similarity sets, colour+texture+size+fill and texture+size+fill:
  8 hierarchies (paper section 3.2 and 3.4, "Selective Search Fast");
* region features (paper section 3.2): colour histogram of 25 bins per channel, texture histogram of Gaussian
  derivatives (sigma 1) in 8 orientations x 10 bins per channel, both L1-normalised and merged by size-weighted
  averaging; similarities: histogram intersection, size 1-(si+sj)/S, fill 1-(bbox(ri u rj)-si-sj)/S;
* regions are neighbours when their pixels are 4-adjacent (computed from the label image);
* ranking (paper section 3.5 / `Image2HierarchicalGrouping.m` + `selective_search_boxes.m`): in a hierarchy of
  n initial regions the merged regions get n-1 (first merge) .. 1 (final merge), the initial regions of a
  segmentation (listed once per segmentation) get n; every value is multiplied by a uniform random number, all
  hierarchies are pooled and sorted ascending; boxes narrower or shorter than `min_box` (20) px are dropped and
  duplicates removed keeping the first. The random numbers come from `np.random.default_rng(seed)`, so the same
  image and seed give the same ranked list.

The "quality" mode of the paper (HSV, Lab, rgI, H, I; k in {50, 100, 150, 300}; 4 similarity sets) is available
as `mode='quality'`, and `mode='single'` (HSV, k=100, colour+texture+size+fill) is the paper's single strategy.

Speed: everything per pixel is numpy (histograms via one `np.bincount` per segmentation on label x bin indices,
neighbours by comparing shifted label arrays); the grouping loop runs per merge over a few hundred regions with a
lazy max-heap of pair similarities: a merge only computes the similarities of the new region with its neighbours
(O(neighbours x bins)), stale pairs are skipped when popped. Felzenszwalb (scikit-image) is ~60% of the time.

Measured on the 517 genuine VOC2007 `val` images of the team's real-data folder (all objects count: that set has no difficult
flags; not VOC07 test): box AR@10/100/1000 = .114/.333/.559 (paper, Hosang's SelectiveSearch on VOC07 test:
.085/.347/.618); OpenCV backend on the same images .034/.215/.538. Median time on 20 of them, one process:
0.98 s/image against OpenCV's 0.93 s/image (same machine, same load).

Backend 'opencv' wraps `cv2.ximgproc.segmentation.createSelectiveSearchSegmentation` (opencv-contrib). Its fast
mode differs from the paper: k = 150, 300, 450 and, above all, its ranking is `rand() x level` with level 1 for the
*initial* regions, so small regions come first -- the inverse of the paper's ranking, which puts the large regions
near the top of each hierarchy first. Its top-N lists are therefore much worse (box AR@100 .215 against .333
here on VOC images). Its ranking draws from the C library's rand(), which is seeded for reproducibility.
"""
from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass

import numpy as np

from core.errors import UserError

__all__ = ["selective_search", "MODES", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("skimage", "opencv")

# similarity sets: (colour, texture, size, fill)
_CTSF = (True, True, True, True)  # SSSimColourTextureSizeFillOrig
_TSF = (False, True, True, True)  # SSSimTextureSizeFill
_F = (False, False, False, True)  # SSSimBoxFillOrig
_S = (False, False, True, False)  # SSSimSize


@dataclass(frozen=True)
class _Mode:
    colour_spaces: tuple[str, ...]
    ks: tuple[int, ...]
    strategies: tuple[tuple[bool, bool, bool, bool], ...]
    sigma: float = 0.8


# R-CNN selective_search_boxes.m: fast_mode -> colorTypes {'Hsv','Lab'}, ks [50 100], simFunctionHandles(1:2);
# otherwise colorTypes {'Hsv','Lab','RGI','H','Intensity'}, ks [50 100 150 300], all four similarity functions.
MODES: dict[str, _Mode] = {
    "fast": _Mode(("hsv", "lab"), (50, 100), (_CTSF, _TSF)),
    "quality": _Mode(("hsv", "lab", "rgi", "h", "i"), (50, 100, 150, 300), (_CTSF, _TSF, _F, _S)),
    "single": _Mode(("hsv",), (100,), (_CTSF,)),
}

_COLOUR_BINS = 25  # paper 3.2: 25 bins per colour channel
_TEX_ORIENT = 8  # paper 3.2: Gaussian derivatives in 8 orientations ...
_TEX_BINS = 10  # ... 10 bins each
_TEX_SIGMA = 1.0  # paper 3.2: sigma = 1
# Upper end of the texture histogram range for images in [0, 1]: the response of a sigma-1 Gaussian derivative to
# a unit step edge is 1/sqrt(2 pi) ~ 0.40 (the VLFeat port of SelectiveSearch uses 0.43 as "maximum" gradient).
_TEX_MAX = 0.43


# ------------------------------------------------------------------------------------------ per-image features
def _colour_image(rgb: np.ndarray, space: str) -> np.ndarray:
    """HxWx3 float32 in [0, 1], quantised to 1/255 steps as the uint8 images of `Image2ColourSpace.m`."""
    from skimage.color import rgb2gray, rgb2hsv, rgb2lab

    f = rgb.astype(np.float32) / 255.0
    if space == "hsv":
        out = rgb2hsv(f)
    elif space == "lab":  # MATLAB makecform('srgb2lab') on uint8: L*255/100, a+128, b+128
        lab = rgb2lab(f)
        out = np.empty_like(lab)
        out[..., 0] = lab[..., 0] / 100.0
        out[..., 1:] = (lab[..., 1:] + 128.0) / 255.0
    elif space == "rgi":  # normalised r, g plus intensity
        s = f.sum(axis=2, keepdims=True)
        out = np.empty_like(f)
        np.divide(f[..., :2], s, out=out[..., :2], where=s > 0)
        out[..., :2][np.broadcast_to(s == 0, out[..., :2].shape)] = 1.0 / 3.0
        out[..., 2] = s[..., 0] / 3.0
    elif space == "h":
        out = np.repeat(rgb2hsv(f)[..., :1], 3, axis=2)
    elif space == "i":
        out = np.repeat(rgb2gray(f)[..., None], 3, axis=2)
    else:
        raise UserError(f"selective search: unknown colour space {space!r}")
    return (np.rint(np.clip(out, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _colour_bins(colour: np.ndarray) -> np.ndarray:
    """(H*W, 3) int32 bin index in [0, 75): channel c, bin round(v * 24)."""
    b = np.minimum(np.rint(colour.reshape(-1, 3) * (_COLOUR_BINS - 1)), _COLOUR_BINS - 1).astype(np.int32)
    return b + np.arange(3, dtype=np.int32) * _COLOUR_BINS


def _texture_codes(colour: np.ndarray) -> np.ndarray:
    """(H*W, 12) int32 signed texture codes in [0, 240) for `_texture_histograms`.

    First-order Gaussian derivatives (sigma 1) along x, y and the two diagonals (steered from the x and y
    derivatives) of each channel: 12 maps. A map's positive part is one orientation, its negative part the opposite
    one: 8 orientations per channel (paper 3.2, "SIFT-like"), each quantised into 10 bins of |d| in [0, _TEX_MAX].
    A pixel adds bin q to one of the two and bin 0 to the other, so one code per map, q + 10 * (d > 0), holds
    both; this halves the per-pixel work against coding the 24 histograms separately.
    """
    from scipy.ndimage import gaussian_filter

    h, w, _ = colour.shape
    out = np.empty((h * w, 12), np.int32)
    scale = np.float32((_TEX_BINS - 1) / _TEX_MAX)
    r = np.float32(np.sqrt(0.5))
    for c in range(3):
        ch = colour[..., c]
        dy = gaussian_filter(ch, _TEX_SIGMA, order=(1, 0), mode="nearest")
        dx = gaussian_filter(ch, _TEX_SIGMA, order=(0, 1), mode="nearest")
        for o, d in enumerate((dx, (dx + dy) * r, dy, (dy - dx) * r)):
            d = d.ravel()
            q = np.minimum(np.rint(np.abs(d) * scale), _TEX_BINS - 1).astype(np.int32)
            q += (d > 0) * np.int32(_TEX_BINS)
            q += (c * 4 + o) * 2 * _TEX_BINS
            out[:, c * 4 + o] = q
    return out


def _texture_histograms(labels: np.ndarray, n: int, codes: np.ndarray) -> np.ndarray:
    """(n, 240) L1-normalised texture histograms: per channel 8 orientations x 10 bins (see `_texture_codes`)."""
    raw = _counts(labels, n, codes, 12 * 2 * _TEX_BINS).reshape(n, 3, 4, 2, _TEX_BINS)
    neg, pos = raw[:, :, :, 0], raw[:, :, :, 1]
    hist = np.empty((n, 3, 2, 4, _TEX_BINS), np.float32)
    hist[:, :, 0] = pos  # orientations 0..3: positive parts; the other pixels add to bin 0
    hist[:, :, 0, :, 0] += neg.sum(axis=-1)
    hist[:, :, 1] = neg  # orientations 4..7: negative parts (opposite directions)
    hist[:, :, 1, :, 0] += pos.sum(axis=-1)
    hist = hist.reshape(n, 3 * _TEX_ORIENT * _TEX_BINS)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    return hist


def _segment(colour: np.ndarray, k: int, sigma: float) -> tuple[np.ndarray, int]:
    """Felzenszwalb-Huttenlocher (IJCV 2004) via scikit-image; labels 0..n-1 (compacted)."""
    from skimage.segmentation import felzenszwalb

    labels = felzenszwalb(colour, scale=k, sigma=sigma, min_size=k, channel_axis=-1).astype(np.int32)
    n = int(labels.max()) + 1
    present = np.bincount(labels.ravel(), minlength=n) > 0
    if not present.all():
        remap = np.cumsum(present, dtype=np.int32) - 1
        labels = remap[labels]
        n = int(present.sum())
    return labels, n


def _neighbour_pairs(labels: np.ndarray, n: int) -> np.ndarray:
    """(E, 2) int64 unique pairs a<b of 4-adjacent regions, from shifted label arrays."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()]).astype(np.int64)
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()]).astype(np.int64)
    m = a != b
    a, b = a[m], b[m]
    code = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return np.stack([code // n, code % n], axis=1)


def _region_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) float64 xyxy 0-based edges of every region."""
    from scipy.ndimage import find_objects

    boxes = np.zeros((n, 4))
    for i, sl in enumerate(find_objects(labels + 1, max_label=n)):
        if sl is not None:
            boxes[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes


def _counts(labels: np.ndarray, n: int, bins: np.ndarray, nbins: int) -> np.ndarray:
    """(n, nbins) int64 counts: one bincount over label * nbins + bin (bins: (H*W, maps) indices)."""
    idx = labels.reshape(-1, 1) * np.int32(nbins) + bins
    return np.bincount(idx.ravel(), minlength=n * nbins).reshape(n, nbins)


def _histograms(labels: np.ndarray, n: int, bins: np.ndarray, nbins: int) -> np.ndarray:
    """(n, nbins) L1-normalised histograms."""
    hist = _counts(labels, n, bins, nbins).astype(np.float32)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    return hist


# ------------------------------------------------------------------------------------------ hierarchical grouping
def _group(hist: np.ndarray | None, sizes: np.ndarray, boxes: np.ndarray, pairs: np.ndarray, area: float,
           use_size: bool, use_fill: bool) -> np.ndarray:
    """Greedy hierarchical grouping (paper Algorithm 1). Returns the boxes of the n-1 merged regions in merge order.

    `hist` holds the concatenated, L1-normalised histograms the strategy compares (colour and/or texture; their
    intersections add up), or None when the strategy uses neither. Pair similarities never change while both
    regions live, so a lazy max-heap is exact: pairs with a dead region are skipped when popped.
    """
    n = len(sizes)
    m = 2 * n - 1
    S = np.empty(m)
    S[:n] = sizes
    B = np.empty((m, 4))
    B[:n] = boxes
    H = None
    if hist is not None:
        H = np.empty((m, hist.shape[1]), np.float32)
        H[:n] = hist
    inv_area = 1.0 / area

    def sims(idx: np.ndarray, t) -> np.ndarray:
        s = np.zeros(len(idx))
        if H is not None:
            s += np.minimum(H[idx], H[t]).sum(axis=1)
        if use_size:
            s += 1.0 - (S[idx] + S[t]) * inv_area
        if use_fill:
            bi, bt = B[idx], B[t]
            bw = np.maximum(bi[..., 2], bt[..., 2]) - np.minimum(bi[..., 0], bt[..., 0])
            bh = np.maximum(bi[..., 3], bt[..., 3]) - np.minimum(bi[..., 1], bt[..., 1])
            s += 1.0 - (bw * bh - S[idx] - S[t]) * inv_area
        return s

    a, b = pairs[:, 0], pairs[:, 1]
    heap = list(zip((-sims(a, b)).tolist(), a.tolist(), b.tolist()))
    heapq.heapify(heap)
    nbrs: list[set] = [set() for _ in range(n)]
    for i, j in zip(a.tolist(), b.tolist()):
        nbrs[i].add(j)
        nbrs[j].add(i)
    alive = bytearray(b"\x01") * m
    heappop, heappush = heapq.heappop, heapq.heappush
    t = n
    while heap and t < m:
        _, i, j = heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = 0
        si, sj = S[i], S[j]
        S[t] = si + sj
        if H is not None:
            H[t] = (H[i] * si + H[j] * sj) / (si + sj)  # size-weighted merge of histograms (paper eq. 3)
        bi, bj = B[i], B[j]
        B[t] = (min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3]))
        nb = nbrs[i] | nbrs[j]
        nb.discard(i)
        nb.discard(j)
        nbrs[i] = nbrs[j] = None  # type: ignore[assignment]
        for k in nb:
            s = nbrs[k]
            s.discard(i)
            s.discard(j)
            s.add(t)
        nbrs.append(nb)
        if nb:
            idx = np.fromiter(nb, np.int64, len(nb))
            for v, k in zip((-sims(idx, t)).tolist(), idx.tolist()):
                heappush(heap, (v, k, t))
        t += 1
    return B[n:t].copy()


def _hierarchies(rgb: np.ndarray, mode: _Mode) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes and priorities of all hierarchies, in R-CNN's order (k outer, colour space inner)."""
    h, w = rgb.shape[:2]
    area = float(h * w)
    colours = {cs: _colour_image(rgb, cs) for cs in mode.colour_spaces}
    cbins = {cs: _colour_bins(c) for cs, c in colours.items()}
    need_tex = any(s[1] for s in mode.strategies)
    need_col = any(s[0] for s in mode.strategies)
    tcodes = {cs: _texture_codes(c) for cs, c in colours.items()} if need_tex else {}
    all_boxes, all_prio = [], []
    for k in mode.ks:
        for cs in mode.colour_spaces:
            labels, n = _segment(colours[cs], k, mode.sigma)
            boxes = _region_boxes(labels, n)
            if n == 1:  # Image2HierarchicalGrouping.m: a single region, no grouping
                all_boxes.append(boxes)
                all_prio.append(np.ones(1))
                continue
            sizes = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
            pairs = _neighbour_pairs(labels, n)
            col = _histograms(labels, n, cbins[cs], 3 * _COLOUR_BINS) if need_col else None
            tex = _texture_histograms(labels, n, tcodes[cs]) if need_tex else None
            for use_c, use_t, use_s, use_f in mode.strategies:
                parts = ([col] if use_c else []) + ([tex] if use_t else [])
                hist = np.concatenate(parts, axis=1) if len(parts) > 1 else (parts[0] if parts else None)
                merged = _group(hist, sizes, boxes, pairs, area, use_s, use_f)
                all_boxes.append(merged)
                all_prio.append(np.arange(len(merged), 0, -1, dtype=np.float64))  # first merge n-1 .. last 1
            # the initial regions, once per segmentation, priority n (Image2HierarchicalGrouping.m)
            all_boxes.append(boxes)
            all_prio.append(np.full(n, float(n)))
    return all_boxes, all_prio


def _rank(boxes: np.ndarray, priority: np.ndarray, seed: int, min_box: int) -> np.ndarray:
    """selective_search_boxes.m: priority .* rand, sort ascending, drop boxes < min_box, remove duplicates."""
    rng = np.random.default_rng(seed)
    order = np.argsort(priority * rng.random(len(priority)), kind="stable")
    boxes = boxes[order]
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(wh >= min_box).all(axis=1)]
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)].astype(np.float32)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise UserError(f"selective search expects an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def selective_search(image: np.ndarray, *, mode: str = "fast", seed: int = 0, min_box: int = 20,
                     backend: str = "skimage") -> np.ndarray:
    """Ranked SelectiveSearch boxes of one image.

    image: HxWx3 uint8 RGB. Returns (n, 4) float32 x1, y1, x2, y2 (0-based pixel edges), best first, every box at
    least `min_box` px wide and high, no duplicates. Deterministic for a given (image, mode, seed, backend).
    backend 'skimage' (default) is this module's implementation of the paper; 'opencv' is OpenCV contrib's
    (see the module docstring: its ranking puts small regions first, unlike the paper's).
    """
    image = _check_image(image)
    if backend == "opencv":
        return _opencv(image, mode=mode, seed=seed, min_box=min_box)
    if backend != "skimage":
        raise UserError(f"selective search: unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")
    if mode not in MODES:
        raise UserError(f"selective search: unknown mode {mode!r} (choose one of {', '.join(MODES)})")
    boxes, prio = _hierarchies(image, MODES[mode])
    return _rank(np.concatenate(boxes), np.concatenate(prio), seed, min_box)


def _seed_c_rand(seed: int) -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None) if os.name != "nt" else ctypes.cdll.msvcrt
        libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
    except (OSError, AttributeError):  # pragma: no cover - exotic platforms
        log.warning("cannot seed the C rand(): OpenCV's SelectiveSearch ranking will not be reproducible")


def _opencv(image: np.ndarray, *, mode: str, seed: int, min_box: int) -> np.ndarray:
    """OpenCV contrib's SelectiveSearch; its own ranking (small regions first), then the same box filters."""
    try:
        import cv2

        seg = cv2.ximgproc.segmentation
    except (ImportError, AttributeError):
        raise UserError(
            "selective search backend 'opencv' needs opencv-contrib (cv2.ximgproc): "
            "pip install opencv-contrib-python-headless, or use backend 'skimage'"
        ) from None
    if mode not in ("fast", "quality", "single"):
        raise UserError(f"selective search: unknown mode {mode!r} (choose one of fast, quality, single)")
    # OpenCV's ranking draws from the C library's rand(): seed it (and cv::RNG) so the list is reproducible
    cv2.setRNGSeed(int(seed))
    _seed_c_rand(int(seed))
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    {"fast": ss.switchToSelectiveSearchFast, "quality": ss.switchToSelectiveSearchQuality,
     "single": ss.switchToSingleStrategy}[mode]()
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h
    keep = (rects[:, 2] >= min_box) & (rects[:, 3] >= min_box)
    rects = rects[keep]
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)].astype(np.float32)
