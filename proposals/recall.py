"""Proposal recall (AR) as DeepMask's official evaluation computes it: the COCO API with ``useCats = 0``.

DeepMask (paper Sec. 4.1, "Metrics"; official code's README and its PyTorch port's ``evalPerImage.py``) scores
class-agnostic proposals with pycocotools' ``COCOeval``: ``params.useCats = 0`` (categories ignored: every
proposal may hit every object; forgetting it gives near-zero results), IoU thresholds .50:.05:.95, ``maxDets``
= the proposal counts, ``iouType`` 'bbox' or 'segm'. AR@n is the recall averaged over the 10 IoU thresholds with
the top n proposals of each image (by score), over all objects of the data set, and AR_S/M/L restrict the objects
to COCO's area ranges (small < 32^2, medium 32^2..96^2, large > 96^2). AUC is the paper's "AR averaged across
all proposal counts": the area under AR versus the number of proposals on a log axis, normalised by the axis
length, computed with the trapezoid rule on a log-spaced grid of counts (`auc_grid`, 1..1000 by default).

Matching is pycocotools' own (``COCOeval.evaluate``: per image, proposals in score order take the best free
object at each IoU threshold). Recall is then read from its per-image results: the greedy matching of the top n
proposals is the prefix of the matching of the top N >= n, so one evaluation at the largest count gives the
recall at every count (identical to ``COCOeval.accumulate``'s ``recall[t, k, a, m]``, which the tests check)
without accumulate's per-count Python loop over all detections.

VOC ground truth (no masks: 'bbox' only) becomes an in-memory COCO object. Difficult objects are marked
``iscrowd = 1``: COCOeval's only way to ignore a ground-truth object (its ``_prepare`` sets ``ignore`` from
``iscrowd``). An ignored object is not in the recall denominator, a proposal matched to it is not counted, and
matching tries the non-ignored objects first (it stops at ignored ones once a proposal has a regular match), so
the recall of the other objects is exactly what it would be without the difficult ones -- the devkit's "neither
hit nor miss". (A crowd region's IoU is intersection over the proposal's area, which only decides whether an
otherwise unmatched proposal is ignored: no effect on recall.)

Image ids: ours are strings (VOC file stems, COCO ``str(int)``); results may carry either our string ids or, for
COCO ground truth, the integer ids. They are mapped to the COCO object's integer ids here.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

# the inputs (ground truth and results) are in recall_inputs; imported from here too
from .recall_inputs import (RecallGT, _quiet_coco, gt_from_coco, gt_from_records, load_results,  # noqa: E402,F401
                            prepare_results, results_from_store)

__all__ = ["IOU_THRESHOLDS", "LOC_IOU_THRESHOLDS", "LOC_COUNTS", "AREA_RANGES", "DEFAULT_COUNTS", "auc_grid", "log_auc",
           "RecallGT", "gt_from_coco", "gt_from_records", "prepare_results", "load_results", "results_from_store",
           "ProposalRecall", "recall_at_iou", "localization_curves", "evaluate_proposals", "nan_to_none"]

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's .50:.05:.95
# .50:.05:1.00 for recall-vs-IoU curves (paper Fig. 4 g-i, Hosang et al.): COCO's ten and IoU 1 (exact boxes)
LOC_IOU_THRESHOLDS = np.append(IOU_THRESHOLDS, 1.0)
LOC_COUNTS = (10, 100, 1000)  # the proposal counts of the recall-vs-IoU panels
AREA_RANGES = {  # COCOeval Params.setDetParams areaRng / areaRngLbl
    "all": (0.0, 1e5 ** 2),
    "small": (0.0, 32.0 ** 2),
    "medium": (32.0 ** 2, 96.0 ** 2),
    "large": (96.0 ** 2, 1e5 ** 2),
}
DEFAULT_COUNTS = (10, 100, 1000)  # paper Tables 1-2: AR@10, AR@100, AR@1000


def auc_grid(max_count: int = 1000, per_decade: int = 10) -> np.ndarray:
    """Log-spaced integer proposal counts 1..max_count (10 per decade: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, ...)."""
    if max_count < 1:
        raise ValueError("max_count must be >= 1")
    k = max(1, int(round(per_decade * math.log10(max_count))))
    g = np.unique(np.round(np.logspace(0.0, math.log10(max_count), k + 1)).astype(np.int64))
    return g[(g >= 1) & (g <= max_count)]


def log_auc(counts: Sequence[int], values: Sequence[float]) -> float:
    """Area under values(counts) with a log x axis, divided by the axis length (= mean on a log scale)."""
    x = np.log(np.asarray(counts, dtype=np.float64))
    y = np.asarray(values, dtype=np.float64)
    if len(x) == 1:
        return float(y[0])
    return float(np.trapezoid(y, x) / (x[-1] - x[0])) if hasattr(np, "trapezoid") else \
        float(np.trapz(y, x) / (x[-1] - x[0]))


# --------------------------------------------------------------------------------------------- ground truth


class ProposalRecall:
    """COCOeval (useCats = 0) of one set of proposals; recall at any count up to ``max_count``.

    ``iou_thresholds`` (default COCO's .50:.05:.95) must contain those ten (AR averages over them, whatever else is
    evaluated); `LOC_IOU_THRESHOLDS` adds IoU 1 for `localization_curves`, one more matching pass per proposal.

    Per area range a and IoU threshold t it keeps the 0-based score ranks of the proposals that matched a
    non-ignored object (one per matched object) and the number of non-ignored objects npig[a]:
    recall(n)[t] = #(ranks < n) / npig.
    """

    def __init__(self, gt: RecallGT, results, iou_type: str = "bbox", max_count: int = 1000,
                 chunk: int = 200, progress: bool = True, source: str = "results",
                 areas: Sequence[str] = tuple(AREA_RANGES), iou_thresholds: Sequence[float] | None = None):
        from pycocotools.cocoeval import COCOeval

        thr = IOU_THRESHOLDS.copy() if iou_thresholds is None else np.asarray(iou_thresholds, np.float64)
        self._ar_mask = np.isin(thr, IOU_THRESHOLDS)
        if self._ar_mask.sum() != len(IOU_THRESHOLDS):
            raise ValueError("iou_thresholds must include IOU_THRESHOLDS (COCO's .50:.05:.95), the AR thresholds")
        self.iou_thresholds = thr
        self.gt = gt
        self.iou_type = iou_type
        self.max_count = int(max_count)
        dts = prepare_results(gt, results, iou_type, source)
        covered = {d["image_id"] for d in dts}
        img_ids = sorted(gt.coco.getImgIds())
        if len(covered) < len(img_ids):
            log.warning("%s: proposals for %d of the %d ground-truth images; the others count as misses",
                        source, len(covered), len(img_ids))
        if dts:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = gt.coco.loadRes(copy.deepcopy(dts))
        else:
            coco_dt = _quiet_coco({"images": list(gt.coco.dataset["images"]), "annotations": [],
                                   "categories": copy.deepcopy(gt.coco.dataset.get("categories", []))})
        ev = COCOeval(gt.coco, coco_dt, iouType=iou_type)
        p = ev.params
        p.useCats = 0  # class-agnostic proposals (DeepMask official evaluation)
        p.iouThrs = thr.copy()
        p.maxDets = [self.max_count]  # evaluateImg keeps the top maxDets[-1]; smaller counts are prefixes
        self.areas = [a for a in AREA_RANGES if a in areas]  # 'all' alone is ~4x faster (COCOeval per area)
        if "all" not in self.areas or any(a not in AREA_RANGES for a in areas):
            raise ValueError(f"areas must include 'all' and be among {list(AREA_RANGES)}")
        p.areaRng = [list(AREA_RANGES[a]) for a in self.areas]
        p.areaRngLbl = list(self.areas)
        T = len(thr)
        ranks: dict[str, list[list[np.ndarray]]] = {a: [[] for _ in range(T)] for a in self.areas}
        npig = {a: 0 for a in self.areas}
        chunks = [img_ids[i:i + chunk] for i in range(0, len(img_ids), chunk)]
        for ids in tqdm(chunks, desc=f"AR ({iou_type})", unit="chunk", disable=not progress or len(chunks) < 2):
            p.imgIds = ids
            with contextlib.redirect_stdout(io.StringIO()):
                ev.evaluate()
            I = len(ids)
            # evalImgs is ordered [category (one: -1)][area][image]
            for ai, a in enumerate(self.areas):
                for e in ev.evalImgs[ai * I:(ai + 1) * I]:
                    if e is None:
                        continue
                    gt_ig = np.asarray(e["gtIgnore"]).astype(bool)
                    npig[a] += int((~gt_ig).sum())
                    dtm = np.asarray(e["dtMatches"])
                    if dtm.size == 0:
                        continue
                    tps = (dtm > 0) & ~np.asarray(e["dtIgnore"]).astype(bool)  # as COCOeval.accumulate
                    for t in range(T):
                        r = np.flatnonzero(tps[t])
                        if r.size:
                            ranks[a][t].append(r)
            ev.evalImgs = []
        self._ranks = {a: [np.sort(np.concatenate(x)) if x else np.zeros(0, np.int64) for x in ranks[a]]
                       for a in self.areas}
        self.npig = npig
        self.n_images = len(img_ids)
        self.n_proposals = len(dts)

    def recall(self, count: int, area: str = "all") -> np.ndarray:
        """Recall per IoU threshold (of ``iou_thresholds``) with the top ``count`` proposals per image; NaN without
        objects."""
        if area not in self._ranks:
            raise ValueError(f"area must be one of {self.areas}")
        if not 1 <= count <= self.max_count:
            raise ValueError(f"count {count} outside 1..{self.max_count} (evaluated up to max_count)")
        n = self.npig[area]
        if n == 0:
            return np.full(len(self.iou_thresholds), np.nan)
        return np.array([np.searchsorted(r, count, side="left") / n for r in self._ranks[area]])

    def ar(self, count: int, area: str = "all") -> float:
        """Average recall over IoU .50:.05:.95 with the top ``count`` proposals per image."""
        return float(np.mean(self.recall(count, area)[self._ar_mask]))

    def ar_curve(self, counts: Iterable[int], area: str = "all") -> np.ndarray:
        """AR for each count (for AR-vs-number-of-proposals plots, paper Fig. 4)."""
        return np.array([self.ar(int(c), area) for c in counts])

    def auc(self, area: str = "all", grid: Sequence[int] | None = None) -> float:
        g = auc_grid(self.max_count) if grid is None else np.asarray(grid)
        return log_auc(g, self.ar_curve(g, area))

    def summary(self, counts: Sequence[int] = DEFAULT_COUNTS, grid: Sequence[int] | None = None) -> dict:
        """AR@n for n in counts, AUC (all/S/M/L), AR_S/M/L@100 (or at the middle count), the AUC grid."""
        g = [int(c) for c in (auc_grid(self.max_count) if grid is None else grid)]
        out = {}
        for c in counts:
            out[f"AR@{c}"] = self.ar(c)
        out["AUC"] = self.auc("all", g)
        ref = 100 if 100 <= self.max_count else int(counts[len(counts) // 2])
        sml = [(a, t) for a, t in (("small", "S"), ("medium", "M"), ("large", "L")) if a in self.areas]
        for a, tag in sml:
            out[f"AR_{tag}@{ref}"] = self.ar(ref, a)
        for a, tag in sml:
            out[f"AUC_{tag}"] = self.auc(a, g)
        out["auc_counts"] = g
        out["iou_type"] = self.iou_type
        out["n_images"] = self.n_images
        out["n_objects"] = self.npig["all"]
        out["n_proposals"] = self.n_proposals
        return out


def recall_at_iou(pr: ProposalRecall, iou: float, counts: Iterable[int], area: str = "all") -> np.ndarray:
    """Recall at one evaluated IoU threshold (e.g. .5, .7) for each count."""
    k = int(np.argmin(np.abs(pr.iou_thresholds - iou)))
    if abs(pr.iou_thresholds[k] - iou) > 1e-6:
        raise ValueError(f"IoU {iou} was not evaluated (thresholds {pr.iou_thresholds.tolist()})")
    return np.array([pr.recall(int(c), area)[k] for c in counts])


def localization_curves(pr: ProposalRecall, counts: Sequence[int] = LOC_COUNTS, grid: Sequence[int] | None = None,
                        area: str = "all") -> dict:
    """The localisation plots' data (paper Fig. 4 g-i; Hosang et al. Figs. 6-7), JSON-ready: recall against the IoU
    threshold at each of `counts` (those <= max_count), and recall at IoU .5 and .7 and AR against the number of
    proposals on `grid` (default auc_grid(max_count))."""
    g = [int(c) for c in (auc_grid(pr.max_count) if grid is None else grid)]
    cs = [int(c) for c in counts if int(c) <= pr.max_count] or [pr.max_count]

    def r5(a):
        return [None if not np.isfinite(v) else round(float(v), 5) for v in a]

    out = {"iou": [round(float(t), 4) for t in pr.iou_thresholds],
           "recall_vs_iou": {str(c): r5(pr.recall(c, area)) for c in cs},
           "counts": g, "AR": r5(pr.ar_curve(g, area))}
    for t in (0.5, 0.7):
        out[f"recall@{t:g}"] = r5(recall_at_iou(pr, t, g, area))
    return out


def evaluate_proposals(gt: RecallGT, results, iou_type: str = "bbox", counts: Sequence[int] = DEFAULT_COUNTS,
                       grid: Sequence[int] | None = None, progress: bool = True,
                       source: str = "results", areas: Sequence[str] = tuple(AREA_RANGES)) -> dict:
    """One call: AR@counts, AUC (log-scale, grid 1..max(counts)), AR_S/M/L@100, AUC_S/M/L, the grid."""
    max_count = int(max(max(counts), max(grid) if grid is not None else 0))
    pr = ProposalRecall(gt, results, iou_type, max_count=max_count, progress=progress, source=source, areas=areas)
    return pr.summary(counts, grid)


def nan_to_none(d: Mapping) -> dict:
    """JSON-safe copy (NaN -> null) for entry points."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
