"""Where full-scene inference puts things on an image: the scaled images packed into one canvas (all scales in one
trunk pass), a patch's mask pasted back into the image, and the RLE of a pasted region without a full-size mask."""
from __future__ import annotations

import math

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def pack_canvases(sizes: list[tuple[int, int]], gap: int = 2):
    """Tile rectangles ``sizes`` [(h, w)] (in cells) into one mosaic, at least ``gap`` empty cells between any two:
    skyline bottom-left packing, tallest first, for several mosaic widths, keeping the smallest area.
    Returns (top-left (row, col) per rectangle in the input order, (H, W) of the mosaic, empty-cell rectangles
    [(r0, c0, r1, c1)] that together cover every cell outside the rectangles)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], -sizes[i][1]))
    max_w = max(w for _, w in sizes)
    sum_w = sum(w for _, w in sizes) + gap * (len(sizes) - 1)
    best = None
    for limit in sorted({int(round(max_w + t * (sum_w - max_w))) for t in np.linspace(0, 1, 13)}):
        sky = np.zeros(limit + gap, np.int64)  # per column: first free row (gaps included)
        where = [None] * len(sizes)
        for i in order:
            h, w = sizes[i]
            tops = np.lib.stride_tricks.sliding_window_view(sky, w + gap).max(1)[:limit - w + 1]
            x = int(np.argmin(tops))
            where[i] = (int(tops[x]), x)
            sky[x:x + w + gap] = tops[x] + h + gap
        H = max(r + sizes[i][0] for i, (r, _) in enumerate(where))
        W = max(c + sizes[i][1] for i, (_, c) in enumerate(where))
        if best is None or H * W < best[1][0] * best[1][1]:
            best = (where, (H, W))
    where, (H, W) = best
    free = np.ones((H, W), bool)
    for (r, c), (h, w) in zip(where, sizes):
        free[r:r + h, c:c + w] = False
    gaps, open_runs = [], {}
    for r in range(H + 1):
        runs = set()
        if r < H:
            d = np.diff(np.concatenate([[0], free[r].astype(np.int8), [0]]))
            runs = set(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))
        for run in [k for k in open_runs if k not in runs]:
            gaps.append((open_runs.pop(run), run[0], r, run[1]))
        for run in runs - set(open_runs):
            open_runs[run] = r
    return where, (H, W), gaps


def paste_mask(logits: np.ndarray, ox: float, oy: float, lx: float, ly: float, height: int, width: int,
               logit_thr: float):
    """Binary mask of one candidate inside the image: ``logits`` (m, m) cover the patch [ox, ox+lx) x [oy, oy+ly)
    (original pixels, continuous coordinates). Returns (region bool array, x0, y0) of the part of the footprint
    that can hold mask pixels, clipped to the image, or None when no pixel can be on (footprint outside the image,
    or no logit above the threshold). Bilinear resize with the half-pixel convention of
    F.interpolate(align_corners=False) (model.upsample_masks), edge values replicated inside the patch.

    Only the window around the logits above the threshold is resized: a bilinear value is a convex combination of
    its 4 nearest logits, so it can exceed the threshold only where one of them does (2 px of margin for cv2's
    fixed-point coordinates). A mask covering a third of its patch is resized on a third of the footprint."""
    m = logits.shape[0]
    x0, x1 = max(0, math.ceil(ox - 0.5)), min(width, math.ceil(ox + lx - 0.5))  # pixel centres inside the patch
    y0, y1 = max(0, math.ceil(oy - 0.5)), min(height, math.ceil(oy + ly - 0.5))
    if x1 <= x0 or y1 <= y0:
        return None
    on = logits > logit_thr
    cols, rows = np.flatnonzero(on.any(0)), np.flatnonzero(on.any(1))
    if not len(cols):
        return None
    fx, fy = m / lx, m / ly
    # pixel X reads logit columns floor(sx), floor(sx) + 1 with sx = fx (X + 0.5 - ox) - 0.5: some column in
    # [c_lo, c_hi] is read iff c_lo - 1 <= sx < c_hi + 1
    x0 = max(x0, math.floor((cols[0] - 0.5) / fx + ox - 0.5) - 2)
    x1 = min(x1, math.ceil((cols[-1] + 1.5) / fx + ox - 0.5) + 2)
    y0 = max(y0, math.floor((rows[0] - 0.5) / fy + oy - 0.5) - 2)
    y1 = min(y1, math.ceil((rows[-1] + 1.5) / fy + oy - 0.5) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    mat = np.array([[fx, 0.0, fx * (x0 + 0.5 - ox) - 0.5], [0.0, fy, fy * (y0 + 0.5 - oy) - 0.5]], np.float64)
    reg = cv2.warpAffine(np.ascontiguousarray(logits, np.float32), mat, (x1 - x0, y1 - y0),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return reg > logit_thr, x0, y0


def region_rle(reg: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """COCO RLE (compressed, ``counts`` as str) of a ``height`` x ``width`` mask that is zero outside the
    rectangle at (x0, y0) holding ``reg`` -- the same dict as ``pycocotools.mask.encode`` of the full mask, from
    the runs of the rectangle alone (no full-size buffer: a full-image encode per proposal was a third of the
    pasting time). Runs are taken in column-major order, the COCO convention."""
    rh, rw = reg.shape
    col = np.zeros((rw, rh + 2), np.uint8)  # each column of the rectangle, with a zero above and below
    col[:, 1:-1] = reg.T
    flat = col.ravel()
    j, k = np.divmod(np.flatnonzero(flat[1:] != flat[:-1]), rh + 2)  # changes, column-major; never across columns
    g = (x0 + j) * height + y0 + k
    if len(g) > 1:  # a run ending at the bottom of a column and one starting at the top of the next: one run
        same = np.flatnonzero(g[1:] == g[:-1])
        if len(same):
            g = np.delete(g, np.concatenate([same, same + 1]))
    bounds = np.concatenate([[0], g, [height * width]])
    counts = np.diff(bounds)
    if len(counts) > 1 and counts[-1] == 0:
        counts = counts[:-1]  # mask on up to the last pixel: no trailing empty run
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
