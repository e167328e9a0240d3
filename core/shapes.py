"""One image of the synthetic "shapes" set (core/synthetic.py writes the set).

Design: a *fair* test of proposal methods
-----------------------------------------
Neither a colour-grouping method (SelectiveSearch) nor a learned one (DeepMask) should win by construction:

* An object class is defined by its SHAPE (a silhouette), never by a colour: every object, and every piece of
  background, is filled with a random texture (stripes, checks, dots, gradients, smooth noise, flat + noise) whose
  two colours are drawn from one per-image palette that the background uses too. So objects are not single
  superpixels, and objects often share colours with the background.
* Cluttered backgrounds: a textured base, often split by a wavy "horizon", then 3-10 clutter elements that are
  NOT objects (irregular blobs, bands/lines, rotated texture rectangles, ellipses), so a grouping method finds many
  non-object regions. A few thin clutter elements are drawn in FRONT of the objects as well.
* Occlusion: 1-6 objects per image drawn in random order; the annotation is the VISIBLE mask (what is left after
  later objects and front clutter are drawn), and every box is that visible mask's extent.
* A wide range of sizes: the object's nominal size is log-uniform from 12 px to 80% of the shorter image side,
  and objects may run off the image (VOC ``truncated`` = 1).

Class mapping (synthetic shapes named with VOC class names so the 20-class detector and the VOC07 metric apply;
the other 14 VOC classes simply never occur):

================  ===============================================================
VOC name          silhouette
================  ===============================================================
``aeroplane``     top view: long fuselage, swept wings, swept tail plane
``bicycle``       side view: two rings (wheels) joined by a triangular bar frame
``bird``          crescent (a disk minus an offset disk)
``boat``          side view: trapezoid hull, mast and a triangular sail
``bottle``        side view: rounded body, shoulder, narrow neck
``car``           side view: long body, trapezoid cabin, two disk wheels
================  ===============================================================

Each object is rotated by up to +-25 degrees, mirrored with probability 1/2 and stretched by 0.8-1.25 along each
axis.

Annotation rules:

* visible area < 16 px: the object is not annotated at all (a scrap no annotator would mark);
* ``difficult`` (VOC XML) when the visible mask is tiny (area < 10x10 px, or its box has a side < 8 px) or mostly
  hidden (visible area < 30% of the object's full, unoccluded and unclipped area);
* the COCO json keeps difficult objects too, with ``iscrowd`` 0 (DeepMask's patch sampler skips small objects
  itself); its ``categories`` are all 20 VOC classes with ids 1..20 in VOC order, so a COCO reader and a VOC reader
  map classes to the same indices. Image id ``'000001'`` has COCO id 1.
* VOC boxes are the visible mask's extent in 1-based inclusive pixels; COCO ``bbox`` is ``[x, y, w, h]`` of the
  same extent (0-based edges). Pixels are written as JPEG (quality 90), so pixel values near edges are blurred a
  little; the annotations are the source of truth.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .boxes import mask_to_box
from .datasets import VOC_CLASSES

# The synthetic classes, in the order of SHAPES below (all are VOC class names).
SHAPE_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "car")


MIN_SIZE_PX = 12              # smallest nominal object size
MAX_SIZE_FRAC = 0.8           # largest nominal object size, fraction of the shorter image side
MIN_KEEP_AREA = 16            # visible area below this: not annotated
DIFFICULT_AREA = 100          # visible area < 10x10 -> difficult
DIFFICULT_SIDE = 8            # visible box side < 8 px -> difficult
DIFFICULT_VISIBLE = 0.3       # visible / full area < 0.3 -> difficult
MAX_OBJECTS = 6


# ----------------------------------------------------------------------------------------------- silhouettes
# Each takes normalised object coordinates (u right, v down; the shape lies inside [-1, 1]^2) and returns a
# boolean mask. All vectorised over the coordinate grids.

def _segment(u, v, p, q, half_width):
    """Pixels within half_width of the segment p-q."""
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    t = np.clip(((u - px) * dx + (v - py) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return (u - px - t * dx) ** 2 + (v - py - t * dy) ** 2 <= half_width ** 2


def _aeroplane(u, v):
    av = np.abs(v)
    fuselage = u ** 2 + (v / 0.13) ** 2 <= 1.0
    wings = (av <= 0.9) & (u <= 0.3 - 0.55 * av) & (u >= -0.15 - 0.3 * av)
    tail = (av <= 0.35) & (u <= -0.7 - 0.4 * av) & (u >= -0.95 - 0.1 * av)
    return fuselage | wings | tail


def _bicycle(u, v):
    m = np.zeros(u.shape, bool)
    for cx in (-0.58, 0.58):
        d2 = (u - cx) ** 2 + (v - 0.25) ** 2
        m |= (d2 <= 0.4 ** 2) & (d2 >= 0.3 ** 2)
    rear, front, crank, seat, head = (-0.58, 0.25), (0.58, 0.25), (0.0, 0.25), (-0.2, -0.3), (0.42, -0.3)
    for p, q in ((rear, crank), (crank, seat), (seat, rear), (seat, head), (head, crank), (head, front),
                 ((-0.32, -0.38), (-0.08, -0.38)), ((0.36, -0.45), (0.5, -0.45)), ((0.42, -0.3), (0.43, -0.45))):
        m |= _segment(u, v, p, q, 0.05)
    return m


def _bird(u, v):
    return (u ** 2 + v ** 2 <= 0.9 ** 2) & ((u - 0.4) ** 2 + (v + 0.1) ** 2 > 0.75 ** 2)


def _boat(u, v):
    hull = (v >= 0.1) & (v <= 0.5) & (np.abs(u) <= 1.0 - 0.8 * (v - 0.1))
    mast = (u >= -0.06) & (u <= 0.02) & (v >= -0.95) & (v <= 0.1)
    sail = (v >= -0.9) & (v <= 0.0) & (u >= 0.05) & (u <= 0.05 + 0.7 * (v + 0.9) / 0.9)
    jib = (v >= -0.75) & (v <= 0.0) & (u <= -0.1) & (u >= -0.1 - 0.5 * (v + 0.75) / 0.75)
    return hull | mast | sail | jib


def _bottle(u, v):
    au = np.abs(u)
    body = (au <= 0.38) & (v >= -0.25) & (v <= 0.92)
    body &= ~((v > 0.78) & ((au - 0.24) ** 2 + (v - 0.78) ** 2 > 0.14 ** 2) & (au > 0.24))  # rounded base
    shoulder = (v >= -0.45) & (v < -0.25) & (au <= 0.14 + 0.24 * (v + 0.45) / 0.2)
    neck = (au <= 0.14) & (v >= -0.95) & (v < -0.45)
    return body | shoulder | neck


def _car(u, v):
    body = (np.abs(u) <= 0.98) & (v >= -0.05) & (v <= 0.35)
    t = (-0.05 - v) / 0.4
    cabin = (t > 0) & (t <= 1) & (u >= -0.6 + 0.2 * t) & (u <= 0.45 - 0.25 * t)
    wheels = ((u + 0.58) ** 2 + (v - 0.38) ** 2 <= 0.2 ** 2) | ((u - 0.58) ** 2 + (v - 0.38) ** 2 <= 0.2 ** 2)
    return body | cabin | wheels


SHAPES: dict[str, Callable] = {
    "aeroplane": _aeroplane, "bicycle": _bicycle, "bird": _bird, "boat": _boat, "bottle": _bottle, "car": _car,
}
assert tuple(SHAPES) == SHAPE_CLASSES and set(SHAPE_CLASSES) <= set(VOC_CLASSES)


# ----------------------------------------------------------------------------------------------- textures

def _colours(rng, palette):
    """Two distinct palette colours with a little jitter (float32 RGB 0..255)."""
    i, j = rng.choice(len(palette), size=2, replace=False)
    jit = rng.uniform(-18, 18, size=(2, 3))
    return np.clip(palette[i] + jit[0], 0, 255), np.clip(palette[j] + jit[1], 0, 255)


def _texture(rng, palette, X, Y):
    """A random texture at absolute pixel coordinates X, Y (float32 arrays, any shape) -> (..., 3) float32."""
    c1, c2 = _colours(rng, palette)
    kind = int(rng.integers(6))
    a = rng.uniform(0, math.pi)
    ca, sa = math.cos(a), math.sin(a)
    U = X * ca + Y * sa
    V = -X * sa + Y * ca
    if kind == 0:  # stripes, hard or smooth
        period = rng.uniform(3, 22)
        t = U / period + rng.uniform()
        w = (t - np.floor(t) < rng.uniform(0.3, 0.7)).astype(np.float32) if rng.uniform() < 0.5 \
            else 0.5 + 0.5 * np.sin(2 * np.pi * t)
    elif kind == 1:  # checks
        p = rng.uniform(4, 24)
        w = ((np.floor(U / p) + np.floor(V / p)) % 2).astype(np.float32)
    elif kind == 2:  # dots on a lattice
        p = rng.uniform(5, 20)
        r = rng.uniform(0.2, 0.45) * p
        du, dv = U % p - p / 2, V % p - p / 2
        w = (du * du + dv * dv <= r * r).astype(np.float32)
    elif kind == 3:  # linear gradient (a long triangle wave, so any window sees a ramp)
        t = U / rng.uniform(40, 400) + rng.uniform()
        w = np.abs(2 * (t - np.floor(t)) - 1)
    elif kind == 4:  # smooth noise: a few random plane waves
        w = np.zeros(X.shape, np.float32)
        n = int(rng.integers(2, 5))
        for _ in range(n):
            b = rng.uniform(0, 2 * math.pi)
            f = 1.0 / rng.uniform(6, 50)
            w += np.sin(2 * np.pi * f * (X * math.cos(b) + Y * math.sin(b)) + rng.uniform(0, 2 * math.pi))
        w = 0.5 + 0.5 * w / n
    else:  # flat colour (the grain below gives it some structure)
        w = np.full(X.shape, rng.uniform(0, 0.3), np.float32)
    w = w.astype(np.float32)
    sigma = rng.uniform(0, 0.12)
    if sigma > 0.01:  # grain
        w = w + rng.standard_normal(X.shape, dtype=np.float32) * np.float32(sigma)
    c1, c2 = c1.astype(np.float32), c2.astype(np.float32)
    return c1 + (c2 - c1) * w[..., None]


# ----------------------------------------------------------------------------------------------- rendering

class _Canvas:
    def __init__(self, rng, h, w):
        self.rng, self.h, self.w = rng, h, w
        self.palette = rng.uniform(0, 255, size=(int(rng.integers(4, 9)), 3))
        self.img = np.empty((h, w, 3), np.float32)
        self.owner = np.full((h, w), -1, np.int16)  # index of the object visible at each pixel, -1 none

    def grids(self, x0, y0, x1, y1):
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return xs + 0.5, ys + 0.5  # pixel centres

    def paint(self, mask, x0, y0, owner):
        """Fill `mask` (window with top-left x0, y0; may extend past the image) with a new texture."""
        h, w = mask.shape
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, self.w), min(y0 + h, self.h)
        if cx1 <= cx0 or cy1 <= cy0:
            self.rng.uniform()  # keep the draw count independent of clipping
            return
        m = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        ys, xs = np.nonzero(m)
        # texture evaluated only where it is painted (cost ~ painted area, not window area)
        tex = _texture(self.rng, self.palette, (xs + cx0).astype(np.float32) + 0.5, (ys + cy0).astype(np.float32) + 0.5)
        self.img[ys + cy0, xs + cx0] = tex
        self.owner[ys + cy0, xs + cx0] = owner

    def window(self, cx, cy, extent):
        x0, y0 = int(math.floor(cx - extent)), int(math.floor(cy - extent))
        x1, y1 = int(math.ceil(cx + extent)) + 1, int(math.ceil(cy + extent)) + 1
        X, Y = self.grids(x0, y0, x1, y1)
        return x0, y0, X - cx, Y - cy


def _clutter(c: _Canvas, big: bool, front: bool = False):
    """One non-object element: blob, band, rotated rectangle or ellipse."""
    rng = c.rng
    side = min(c.h, c.w)
    kind = int(rng.integers(4)) if not front else int(rng.choice([0, 1]))
    R = rng.uniform(0.15, 0.6) * side if big else rng.uniform(4, 0.2 * side)
    if front:
        R = rng.uniform(3, 0.12 * side)
    cx, cy = rng.uniform(0, c.w), rng.uniform(0, c.h)
    a = rng.uniform(0, math.pi)
    ca, sa = math.cos(a), math.sin(a)
    if kind == 1:  # band / line: long and thin
        length = rng.uniform(0.3, 1.2) * max(c.h, c.w)
        half = rng.uniform(1, 8) if not big else rng.uniform(3, 0.08 * side)
        ext = length / 2 + half + 1
    else:
        ext = 1.45 * R + 1
    x0, y0, dx, dy = c.window(cx, cy, ext)
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    if kind == 0:  # irregular blob: radius modulated by a few harmonics
        theta = np.arctan2(v, u)
        r = np.ones_like(theta)
        for k in range(2, 6):
            r += rng.uniform(0, 0.3) / k * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        mask = u * u + v * v <= (R * r) ** 2
    elif kind == 1:
        mask = (np.abs(u) <= length / 2) & (np.abs(v) <= half)
    elif kind == 2:  # rotated rectangle
        asp = rng.uniform(0.3, 1.0)
        mask = (np.abs(u) <= R) & (np.abs(v) <= R * asp)
    else:  # ellipse
        asp = rng.uniform(0.3, 1.0)
        mask = (u / R) ** 2 + (v / (R * asp)) ** 2 <= 1
    c.paint(mask, x0, y0, -1)


def _background(c: _Canvas):
    rng = c.rng
    X, Y = c.grids(0, 0, c.w, c.h)
    c.img[:] = _texture(rng, c.palette, X, Y)
    if rng.uniform() < 0.6:  # a wavy "horizon" splitting the scene into two textured regions
        a = rng.uniform(-0.6, 0.6)
        y0 = rng.uniform(0.2, 0.8) * c.h
        amp, per, ph = rng.uniform(0, 12), rng.uniform(30, 200), rng.uniform(0, 2 * math.pi)
        mask = Y > y0 + a * (X - c.w / 2) + amp * np.sin(2 * np.pi * X / per + ph)
        c.paint(mask, 0, 0, -1)
    for i in range(int(rng.integers(3, 11))):
        _clutter(c, big=i < 2)


def _place_object(c: _Canvas, cls_idx: int, obj_idx: int):
    """Draw one object; returns its full (unclipped, unoccluded) area."""
    rng = c.rng
    size = math.exp(rng.uniform(math.log(MIN_SIZE_PX), math.log(MAX_SIZE_FRAC * min(c.h, c.w))))
    r = size / 2
    cx, cy = rng.uniform(0, c.w), rng.uniform(0, c.h)
    a = math.radians(rng.uniform(-25, 25))
    sx, sy = rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.25)
    flip = -1.0 if rng.uniform() < 0.5 else 1.0
    x0, y0, dx, dy = c.window(cx, cy, r * max(sx, sy) * math.sqrt(2) + 1)
    ca, sa = math.cos(a), math.sin(a)
    u = flip * (dx * ca + dy * sa) / (r * sx)
    v = (-dx * sa + dy * ca) / (r * sy)
    mask = SHAPES[SHAPE_CLASSES[cls_idx]](u, v)
    c.paint(mask, x0, y0, obj_idx)
    h, w = mask.shape
    inside = mask[max(0, -y0):max(0, min(h, c.h - y0)), max(0, -x0):max(0, min(w, c.w - x0))]
    return int(mask.sum()), int(inside.sum())


def render(seed: int, index: int, size: int = 256):
    """Render synthetic image `index` of the set with `seed`.

    Returns (image HxWx3 uint8 RGB, objects) where each object is a dict with ``label`` (index into
    SHAPE_CLASSES), ``mask`` (visible, HxW bool), ``box`` (x1, y1, x2, y2 ints, 0-based edges of the visible mask),
    ``area``, ``full_area``, ``difficult`` and ``truncated``, in drawing order (back to front).
    """
    rng = np.random.default_rng([seed, index])
    long_side, short_side = size, int(round(size * rng.uniform(0.75, 1.0)))
    h, w = (short_side, long_side) if rng.uniform() < 0.6 else (long_side, short_side)
    for _attempt in range(100):
        c = _Canvas(rng, h, w)
        _background(c)
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        placed = []
        for k in range(n):
            cls_idx = int(rng.integers(len(SHAPE_CLASSES)))
            full, inside = _place_object(c, cls_idx, k)
            placed.append((cls_idx, full, inside))
        for _ in range(int(rng.integers(0, 3))):
            _clutter(c, big=False, front=True)
        objects = []
        for k, (cls_idx, full, inside) in enumerate(placed):
            mask = c.owner == k
            area = int(mask.sum())
            if area < MIN_KEEP_AREA:
                continue
            box = tuple(int(b) for b in mask_to_box(mask))  # 0-based edges of the visible mask
            bw, bh = box[2] - box[0], box[3] - box[1]
            difficult = area < DIFFICULT_AREA or min(bw, bh) < DIFFICULT_SIDE or area < DIFFICULT_VISIBLE * full
            objects.append(dict(label=cls_idx, mask=mask, box=box, area=area, full_area=full,
                                difficult=bool(difficult), truncated=inside < full))
        if objects:
            break
    else:  # pragma: no cover - practically impossible
        raise RuntimeError(f"synthetic image {index}: no visible object after 100 attempts")
    noise = rng.uniform(0, 6)
    img = c.img
    if noise > 0.5:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects
