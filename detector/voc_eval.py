"""PASCAL VOC2007 detection metric: 11-point interpolated AP at IoU > 0.5.

Semantics follow py-faster-rcnn's ``lib/datasets/voc_eval.py`` with ``use_07_metric=True`` (itself a port of
the VOC2007 MATLAB devkit ``VOCevaldet.m``); the code here is written independently and vectorised:

* per class, detections are sorted by confidence, descending; ties keep their input order (stable sort; the
  devkit's ``np.argsort(-confidence)`` is not stable, so tie order there is unspecified);
* each detection is compared with the ground-truth boxes *of its class in its image* and takes the one with the
  highest IoU, difficult and already-matched boxes included (first one on an exact tie, as ``np.argmax``);
* IoU > 0.5 (strictly; the MATLAB devkit uses >= 0.5) with the devkit's +1 pixel convention: our 0-based-edge
  boxes ``x1, y1, x2, y2`` become the devkit's 1-based inclusive ``x1+1, y1+1, x2, y2`` and a width is
  ``x2 - x1 + 1`` there; the arithmetic is done in float64 in the devkit's order of operations;
* a match on a difficult box is ignored (neither TP nor FP); a match on a free non-difficult box is a TP and
  takes the box; a match on a taken box is a FP (duplicate); no match is a FP;
* npos = number of non-difficult ground-truth boxes of the class;
* AP = mean over t in {0, 0.1, ..., 1} of the max precision at recall >= t (0 when no recall reaches t). The
  thresholds are ``np.arange(0., 1.1, 0.1)`` as in py-faster-rcnn, so they carry its floating-point values
  (e.g. t = 0.30000000000000004: a recall of exactly 3/10 does *not* reach it, as in py-faster-rcnn).

Two corner cases where py-faster-rcnn gives NaN are defined here: precision where no detection has counted yet
(tp + fp = 0, i.e. the best detections only hit difficult boxes) is 0 instead of 0/0 (the MATLAB devkit's
``max`` skips those NaNs; Detectron's port uses the same eps guard), and a class without non-difficult
ground truth gets AP 0 (as both devkits), with a warning.

Matching does not depend on which boxes are taken (the devkit never moves a detection to its second-best box),
so a detection is a TP exactly when it is the first detection, in score order, whose best box is that
(non-difficult) box; this turns the devkit's sequential loop into a few array operations per class.

The devkit's result files are read and written by detector/voc_results.py.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from core.errors import DataError

log = logging.getLogger(__name__)

# py-faster-rcnn voc_ap(use_07_metric=True): `for t in np.arange(0., 1.1, 0.1)` -- same floats on purpose.
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)
IOU_THRESHOLD = 0.5

# Detections of one class may be given as {image_id: (boxes (n,4), scores (n,))} or, to keep a file's exact
# order, as FlatDetections (one entry per detection, in order).


class FlatDetections(NamedTuple):
    """Detections of one class in a fixed order: image id per detection, boxes (n,4) 0-based edges, scores."""

    image_ids: list
    boxes: np.ndarray
    scores: np.ndarray


@dataclass
class ClassEval:
    """Result of `eval_class`: AP, the precision/recall curve in score order, per-detection TP/FP, npos."""

    ap: float
    rec: np.ndarray
    prec: np.ndarray
    tp: np.ndarray  # (n,) 1.0 where the sorted detection is a true positive
    fp: np.ndarray  # (n,) 1.0 where it is a false positive (both 0: matched a difficult box, ignored)
    npos: int

    def __float__(self) -> float:
        return float(self.ap)


# ----------------------------------------------------------------------------------------------- the metric


def voc07_ap(rec, prec) -> float:
    """VOC2007 11-point interpolated AP: mean over t in {0, .1, ..., 1} of max(prec[rec >= t]) (0 if none)."""
    rec = np.asarray(rec, dtype=np.float64).ravel()
    prec = np.asarray(prec, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"rec and prec differ in length: {rec.shape} vs {prec.shape}")
    ps = []
    for t in VOC07_RECALL_THRESHOLDS:
        sel = rec >= t
        ps.append(float(np.max(prec[sel])) if sel.any() else 0.0)
    # exactly rounded sum / 11 (the devkit adds p/11 eleven times, which can end 1 ulp off, e.g. a perfect
    # class at 1.0000000000000002); the value is otherwise the same
    return math.fsum(ps) / 11.0


def _to_devkit(boxes: np.ndarray) -> np.ndarray:
    """0-based pixel edges -> the devkit's 1-based inclusive coordinates (x1+1, y1+1, x2, y2), float64."""
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    b[:, :2] += 1.0
    return b


def _best_overlaps(det: np.ndarray, det_img: np.ndarray, gt: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                   chunk_elems: int = 1 << 21) -> tuple[np.ndarray, np.ndarray]:
    """For every detection, the highest IoU with a gt box of its image and the index of that box.

    det: (n,4) and gt: (m,4) in devkit coordinates, gt grouped by image (image i owns gt[starts[i]:starts[i]+
    counts[i]]). Same arithmetic as py-faster-rcnn voc_eval (intersection with +1, union of +1 widths) and the
    same np.argmax/np.max semantics per detection (first maximum; a NaN IoU wins and then fails `> thresh`).
    Detections are grouped by the number k of gt boxes in their image so the work is exactly the number of
    (detection, gt of its image) pairs. A detection in an image without gt gets -inf (and index -1).
    """
    n = det.shape[0]
    ovmax = np.full(n, -np.inf)
    jmax = np.full(n, -1, dtype=np.int64)
    if n == 0 or gt.shape[0] == 0:
        return ovmax, jmax
    k_of_det = counts[det_img]
    gx1, gy1, gx2, gy2 = (np.ascontiguousarray(gt[:, c]) for c in range(4))
    for k in np.flatnonzero(np.bincount(k_of_det)):
        k = int(k)
        if k == 0:
            continue
        sel_all = np.flatnonzero(k_of_det == k)
        step = max(1, chunk_elems // k)
        ar = np.arange(k)
        for s in range(0, sel_all.shape[0], step):
            sel = sel_all[s:s + step]
            idx = starts[det_img[sel]][:, None] + ar  # (c,k) gt indices
            d = det[sel]
            bx1, by1, bx2, by2 = (d[:, c:c + 1] for c in range(4))
            g1, g2, g3, g4 = gx1[idx], gy1[idx], gx2[idx], gy2[idx]
            with np.errstate(invalid="ignore", divide="ignore"):
                iw = np.maximum(np.minimum(g3, bx2) - np.maximum(g1, bx1) + 1.0, 0.0)
                ih = np.maximum(np.minimum(g4, by2) - np.maximum(g2, by1) + 1.0, 0.0)
                inters = iw * ih
                uni = (bx2 - bx1 + 1.0) * (by2 - by1 + 1.0) + (g3 - g1 + 1.0) * (g4 - g2 + 1.0) - inters
                ov = inters / uni
            j = np.argmax(ov, axis=1)
            r = np.arange(sel.shape[0])
            ovmax[sel] = ov[r, j]
            jmax[sel] = idx[r, j]
    return ovmax, jmax


def _eval_arrays(det_boxes: np.ndarray, det_scores: np.ndarray, det_img: np.ndarray,
                 gt_boxes: np.ndarray, gt_img: np.ndarray, gt_difficult: np.ndarray, n_img: int,
                 iou_thresh: float = IOU_THRESHOLD) -> ClassEval:
    """Core of the metric on flat arrays. Boxes in 0-based edges; *_img are indices in [0, n_img)."""
    det_scores = np.asarray(det_scores, dtype=np.float64).ravel()
    det_img = np.asarray(det_img, dtype=np.int64).ravel()
    gt_img = np.asarray(gt_img, dtype=np.int64).ravel()
    gt_difficult = np.asarray(gt_difficult, dtype=bool).ravel()
    npos = int((~gt_difficult).sum())
    nd = det_scores.shape[0]

    # ground truth grouped by image, input order kept within an image (argmax ties -> first box, as the devkit)
    g_order = np.argsort(gt_img, kind="stable")
    gt = _to_devkit(gt_boxes)[g_order]
    g_diff = gt_difficult[g_order]
    counts = np.bincount(gt_img, minlength=n_img)
    starts = np.zeros(n_img, dtype=np.int64)
    if n_img > 1:
        np.cumsum(counts[:-1], out=starts[1:])

    # detections sorted by confidence, descending, ties in input order
    order = np.argsort(-det_scores, kind="stable")
    d = _to_devkit(det_boxes)[order]
    dimg = det_img[order]
    ovmax, jmax = _best_overlaps(d, dimg, gt, starts, counts)

    hit = ovmax > iou_thresh  # NaN / -inf compare False -> FP, as in the devkit
    difficult_hit = np.zeros(nd, dtype=bool)
    difficult_hit[hit] = g_diff[jmax[hit]]
    cand = np.flatnonzero(hit & ~difficult_hit)  # in score order
    tp = np.zeros(nd)
    if cand.size:
        _, first = np.unique(jmax[cand], return_index=True)  # first detection (score order) to claim each box
        tp[cand[first]] = 1.0
    fp = np.where(difficult_hit, 0.0, 1.0 - tp)

    tp_c = np.cumsum(tp)
    fp_c = np.cumsum(fp)
    rec = tp_c / float(npos) if npos > 0 else np.zeros(nd)
    # eps guard where only difficult hits have been seen (tp + fp = 0); elsewhere identical to tp / (tp + fp)
    prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    ap = voc07_ap(rec, prec)
    return ClassEval(ap=ap, rec=rec, prec=prec, tp=tp, fp=fp, npos=npos)


# ------------------------------------------------------------------------------------- inputs -> flat arrays


def as_boxes(boxes, what: str) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] != 4:
        raise DataError(f"{what}: boxes must have shape (n, 4), got {b.shape}")
    return b


def _per_image(boxes, values, dtype, what: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One image's boxes (n,4) and per-box ``values`` (n,) of ``dtype`` (scores, difficult flags), checked."""
    b = as_boxes(boxes, what)
    v = np.asarray(values, dtype=dtype).ravel()
    if v.shape[0] != b.shape[0]:
        raise DataError(f"{what}: {b.shape[0]} boxes but {v.shape[0]} {name}")
    return b, v


def _stack(parts: list[tuple[np.ndarray, np.ndarray, int]], dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image (boxes, values, image index) -> all boxes (n,4), values (n,) and image index per box (n,)."""
    if not parts:
        return np.zeros((0, 4)), np.zeros(0, dtype), np.zeros(0, np.int64)
    return (np.concatenate([b for b, _, _ in parts]), np.concatenate([v for _, v, _ in parts]),
            np.concatenate([np.full(b.shape[0], k, dtype=np.int64) for b, _, k in parts]))


def _flatten_dets(dets, index: Mapping, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dict {image_id: (boxes, scores)} or FlatDetections -> (boxes (n,4), scores (n,), image index (n,))."""
    if isinstance(dets, FlatDetections) or (isinstance(dets, tuple) and len(dets) == 3):
        ids, boxes, scores = dets
        boxes = as_boxes(boxes, what)
        scores = np.asarray(scores, dtype=np.float64).ravel()
        try:
            img = np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise DataError(f"{what}: detections for image id {e.args[0]!r}, which is not in the split") from None
    else:
        parts = []
        for iid, val in dets.items():
            if iid not in index:
                raise DataError(f"{what}: detections for image id {iid!r}, which is not in the split")
            try:
                b, s = val
            except (TypeError, ValueError):
                raise DataError(f"{what}: image {iid!r}: detections must be (boxes, scores)") from None
            parts.append(_per_image(b, s, np.float64, f"{what}: image {iid!r}", "scores") + (index[iid],))
        boxes, scores, img = _stack(parts, np.float64)
    if scores.shape[0] != boxes.shape[0]:
        raise DataError(f"{what}: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    bad = ~(np.isfinite(scores) & np.isfinite(boxes).all(axis=1))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        iid = list(index)[int(img[k])]
        raise DataError(f"{what}: image {iid!r}: non-finite score or box {scores[k]} {boxes[k].tolist()}")
    return boxes, scores, img


def eval_class(dets, gts: Mapping, iou_thresh: float = IOU_THRESHOLD, name: str = "detections") -> ClassEval:
    """VOC07 AP of one class.

    dets: {image_id: (boxes (n,4) 0-based edges, scores (n,))} or FlatDetections (order kept for ties);
    gts: {image_id: (boxes (m,4) 0-based edges, difficult (m,) bool)} -- every image of the split, also those
    without objects of the class (their detections are false positives). Returns a ClassEval (float() = AP).
    A detection on an image not in gts raises DataError naming it.
    """
    index = {iid: k for k, iid in enumerate(gts)}
    parts = [_per_image(b, dif, bool, f"ground truth of image {iid!r}", "difficult flags") + (index[iid],)
             for iid, (b, dif) in gts.items()]
    gt_boxes, gt_diff, gt_img = _stack(parts, bool)
    boxes, scores, img = _flatten_dets(dets, index, name)
    return _eval_arrays(boxes, scores, img, gt_boxes, gt_img, gt_diff, len(index), iou_thresh)


# ------------------------------------------------------------------------------------------ whole data set


def _records_of(gt) -> list:
    if isinstance(gt, (list, tuple)):
        return list(gt)
    return [gt[i] for i in range(len(gt))]


def evaluate_detections(gt, detections: Mapping, classes: Sequence[str] | None = None,
                        iou_thresh: float = IOU_THRESHOLD) -> dict:
    """VOC07 mAP over classes.

    gt: a dataset (VOCDataset-like: ``.classes``, ``len``, ``[i] -> Record``), a list of Records (then
    ``classes`` defaults to VOC_CLASSES), or a dict {class: {image_id: (boxes, difficult)}} covering every image
    of the split for every class.
    detections: {class: {image_id: (boxes, scores)} or FlatDetections}; a class without an entry has no
    detections (AP 0); a class not in ``classes`` raises DataError.
    Returns {'mAP': mean AP over the classes, 'ap': {class: AP}} (plain floats).
    """
    if isinstance(gt, Mapping):
        classes = list(classes) if classes is not None else list(gt)
        missing = [c for c in classes if c not in gt]
        if missing:
            raise DataError(f"ground truth has no entry for class(es) {missing}")
        per_class = None
    else:
        if classes is None:
            classes = getattr(gt, "classes", None)
        if classes is None:
            from core.datasets import VOC_CLASSES
            classes = VOC_CLASSES
        classes = list(classes)
        records = _records_of(gt)
        image_ids = [r.image_id for r in records]
        if len(set(image_ids)) != len(image_ids):
            raise DataError("ground truth lists an image id twice")
        index = {iid: k for k, iid in enumerate(image_ids)}
        n = [len(r.boxes) for r in records]
        gt_boxes = np.concatenate([np.asarray(r.boxes, np.float64).reshape(-1, 4) for r in records]) \
            if records else np.zeros((0, 4))
        gt_labels = np.concatenate([np.asarray(r.labels, np.int64).ravel() for r in records]) \
            if records else np.zeros(0, np.int64)
        gt_diff = np.concatenate([np.asarray(r.difficult, bool).ravel() for r in records]) \
            if records else np.zeros(0, bool)
        gt_img = np.repeat(np.arange(len(records), dtype=np.int64), n)
        per_class = (index, gt_boxes, gt_labels, gt_diff, gt_img)

    unknown = [c for c in detections if c not in classes]
    if unknown:
        raise DataError(f"detections for unknown class(es) {unknown}; classes are {classes}")

    aps: dict[str, float] = {}
    for ci, cls in enumerate(classes):
        dets = detections.get(cls, {})
        if per_class is None:
            res = eval_class(dets, gt[cls], iou_thresh, name=f"class {cls!r}")
        else:
            index, gt_boxes, gt_labels, gt_diff, gt_img = per_class
            sel = gt_labels == ci
            boxes, scores, img = _flatten_dets(dets, index, f"class {cls!r}")
            res = _eval_arrays(boxes, scores, img, gt_boxes[sel], gt_img[sel], gt_diff[sel], len(index),
                               iou_thresh)
        if res.npos == 0:
            log.warning("class %s has no non-difficult ground truth in this split: AP set to 0", cls)
        aps[cls] = float(res.ap)
    m = float(np.mean(list(aps.values()))) if aps else float("nan")
    return {"mAP": m, "ap": aps}


def detections_by_class(per_image: Mapping, classes: Sequence[str]) -> dict:
    """{image_id: (boxes (n,4), scores (n,), labels (n,) 0-based class index)} -> {class: {image_id: (b, s)}}."""
    out: dict[str, dict] = {c: {} for c in classes}
    for iid, (boxes, scores, labels) in per_image.items():
        boxes = np.asarray(boxes).reshape(-1, 4)
        scores = np.asarray(scores).ravel()
        labels = np.asarray(labels).ravel()
        for ci in np.unique(labels):
            if not 0 <= ci < len(classes):
                raise DataError(f"image {iid!r}: label {ci} outside the {len(classes)} classes")
            sel = labels == ci
            out[classes[int(ci)]][iid] = (boxes[sel], scores[sel])
    return out


def format_table(result: Mapping) -> str:
    """Human-readable per-class AP table (for entry points)."""
    lines = [f"{'class':<14s} {'AP':>7s}"]
    for c, ap in result["ap"].items():
        lines.append(f"{c:<14s} {100 * ap:7.2f}")
    m = result["mAP"]
    lines.append(f"{'mAP':<14s} {100 * m:7.2f}" if not math.isnan(m) else f"{'mAP':<14s}     nan")
    return "\n".join(lines)
