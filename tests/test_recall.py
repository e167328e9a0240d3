"""Proposal recall (proposals/recall.py): hand-made cases, VOC difficult handling, equality with pycocotools'
COCOeval (useCats=0) on the shared COCO masks, segm AR from RLE proposals, proposal stores."""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from core.errors import DataError
from proposals.recall import (
    IOU_THRESHOLDS,
    LOC_IOU_THRESHOLDS,
    ProposalRecall,
    auc_grid,
    evaluate_proposals,
    gt_from_coco,
    gt_from_records,
    localization_curves,
    log_auc,
    prepare_results,
    results_from_store,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO_VAL = SHARED / "coco128-masks" / "annotations" / "instances_val2017.json"
needs_coco = pytest.mark.skipif(not COCO_VAL.is_file(), reason=f"shared COCO masks not present at {COCO_VAL}")


def rec(iid, boxes, difficult=None, w=200, h=100):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return SimpleNamespace(image_id=iid, path=f"{iid}.jpg", width=w, height=h, boxes=boxes,
                           labels=np.zeros(n, np.int64),
                           difficult=np.zeros(n, bool) if difficult is None else np.array(difficult, bool),
                           iscrowd=np.zeros(n, bool), segmentations=None)


def xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def test_auc_grid_and_log_auc():
    g = auc_grid(1000)
    assert g[0] == 1 and g[-1] == 1000 and np.all(np.diff(g) > 0)
    assert {10, 100, 1000} <= set(g.tolist())
    assert log_auc(g, np.full(len(g), 0.3)) == pytest.approx(0.3)
    # AR linear in log n from 0 at n=1 to 1 at n=1000 -> mean on the log axis = .5
    assert log_auc([1, 10, 100, 1000], [0, 1 / 3, 2 / 3, 1]) == pytest.approx(0.5)


def test_perfect_and_hand_made_recall():
    A, B = [10, 10, 50, 50], [100, 20, 180, 90]
    gt = gt_from_records([rec("000001", [A, B]), rec("000002", [])], ["x"])
    # perfect proposals -> AR 1 at every count
    res = [{"image_id": "000001", "bbox": xywh(A), "score": 0.9}, {"image_id": "000001", "bbox": xywh(B), "score": 0.8}]
    pr = ProposalRecall(gt, res, max_count=10, progress=False)
    assert pr.ar(2) == 1.0 and pr.ar(10) == 1.0
    # top-1 finds only A -> recall .5 at every IoU threshold
    assert pr.ar(1) == 0.5
    # A proposal [10,10,50,38.8] covers 28.8/40 = .72 of A: hit at IoU .5, .55, .6, .65, .7 -> recall .5 at
    # those, 0 at .75 .. .95; B missed -> AR = (5 * .5) / 10 = .25
    res = [{"image_id": "000001", "bbox": xywh([10, 10, 50, 38.8]), "score": 1.0}]
    pr = ProposalRecall(gt, res, max_count=10, progress=False)
    np.testing.assert_allclose(pr.recall(1), [0.5] * 5 + [0] * 5)
    assert pr.ar(1) == pytest.approx(0.25)
    # a duplicate does not count twice; no proposals -> 0
    res = [{"image_id": "000001", "bbox": xywh(A), "score": s} for s in (0.9, 0.8)]
    assert ProposalRecall(gt, res, max_count=10, progress=False).ar(10) == 0.5
    assert ProposalRecall(gt, [], max_count=10, progress=False).ar(10) == 0.0


def test_voc_difficult_neither_hit_nor_miss():
    A, D = [10, 10, 50, 50], [100, 20, 180, 90]
    gt = gt_from_records([rec("a", [A, D], difficult=[False, True])], ["x"])
    on_a = {"image_id": "a", "bbox": xywh(A), "score": 0.5}
    on_d = {"image_id": "a", "bbox": xywh(D), "score": 0.9}
    # only A counts: finding it is recall 1 even when a higher-scored proposal sits on the difficult box
    assert ProposalRecall(gt, [on_d, on_a], max_count=10, progress=False).ar(10) == 1.0
    assert ProposalRecall(gt, [on_d], max_count=10, progress=False).ar(10) == 0.0
    pr = ProposalRecall(gt, [on_a], max_count=10, progress=False)
    assert pr.npig["all"] == 1
    # the same as dropping the difficult object
    gt2 = gt_from_records([rec("a", [A])], ["x"])
    assert ProposalRecall(gt2, [on_d, on_a], max_count=10, progress=False).ar(1) == \
        ProposalRecall(gt, [on_d, on_a], max_count=10, progress=False).ar(1) == 0.0


def test_recall_against_iou_up_to_1():
    """IoU thresholds .50:.05:1.00 (localisation plots): IoU 1 counts exact boxes only; AR is still the mean over
    .50:.95, the same as without the extra threshold."""
    A, B = [10, 10, 50, 50], [100, 20, 180, 90]
    gt = gt_from_records([rec("000001", [A, B])], ["x"])
    # A exactly (IoU 1), B at IoU 50.4 / 70 = .72 (hits at .5 .. .7)
    res = [{"image_id": "000001", "bbox": xywh(A), "score": 1.0},
           {"image_id": "000001", "bbox": xywh([100, 20, 180, 70.4]), "score": 0.9}]
    pr = ProposalRecall(gt, res, max_count=10, progress=False, iou_thresholds=LOC_IOU_THRESHOLDS)
    np.testing.assert_allclose(pr.recall(2), [1.0] * 5 + [0.5] * 6)
    np.testing.assert_allclose(pr.recall(1), [0.5] * 11)
    ref = ProposalRecall(gt, res, max_count=10, progress=False)
    assert pr.ar(2) == ref.ar(2) == pytest.approx(0.75)
    assert str(pr.summary((1, 2, 10))) == str(ref.summary((1, 2, 10)))  # (NaN S/M/L: no such objects)
    loc = localization_curves(pr, counts=(1, 2, 100), grid=[1, 2, 10])
    assert loc["iou"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    assert set(loc["recall_vs_iou"]) == {"1", "2"} and loc["recall_vs_iou"]["2"][-1] == 0.5
    assert loc["recall@0.5"] == [0.5, 1.0, 1.0] and loc["recall@0.7"] == [0.5, 1.0, 1.0]
    assert loc["AR"] == [0.5, 0.75, 0.75]
    with pytest.raises(ValueError, match="must include"):
        ProposalRecall(gt, res, max_count=10, progress=False, iou_thresholds=[0.5, 1.0])


def test_area_ranges_and_summary_keys():
    small, large = [0, 0, 20, 20], [0, 0, 150, 100]  # areas 400 (< 32^2) and 15000 (> 96^2)
    gt = gt_from_records([rec("a", [small, large])], ["x"])
    res = [{"image_id": "a", "bbox": xywh(large), "score": 1.0}]
    s = evaluate_proposals(gt, res, counts=(10, 100, 1000), progress=False)
    assert s["AR_L@100"] == 1.0 and s["AR_S@100"] == 0.0 and np.isnan(s["AR_M@100"])
    assert s["AR@10"] == 0.5
    for k in ("AR@10", "AR@100", "AR@1000", "AUC", "AR_S@100", "AR_M@100", "AR_L@100", "auc_counts"):
        assert k in s
    assert s["auc_counts"][-1] == 1000
    # recall of 1 of 2 objects from n = 1 on -> AUC .5
    assert s["AUC"] == pytest.approx(0.5)
    # only the 'all' range (faster): same AR, no S/M/L keys
    s2 = evaluate_proposals(gt, res, counts=(10, 100), progress=False, areas=("all",))
    assert s2["AR@10"] == 0.5 and "AR_S@100" not in s2


def test_bad_results():
    gt = gt_from_records([rec("a", [[0, 0, 10, 10]])], ["x"])
    with pytest.raises(DataError, match="'zzz'"):
        prepare_results(gt, [{"image_id": "zzz", "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(DataError, match="entry 0: bbox"):
        prepare_results(gt, [{"image_id": "a", "bbox": [0, 0, 1], "score": 1}])
    with pytest.raises(DataError, match="entry 1: score"):
        prepare_results(gt, [{"image_id": "a", "bbox": [0, 0, 1, 1], "score": 1},
                             {"image_id": "a", "bbox": [0, 0, 1, 1], "score": "x"}])
    with pytest.raises(DataError, match="no instance masks"):
        prepare_results(gt, [], iou_type="segm")
    with pytest.raises(DataError, match="expected a JSON list"):
        prepare_results(gt, {"image_id": "a"})
    pr = ProposalRecall(gt, [], max_count=10, progress=False)
    with pytest.raises(ValueError, match="outside"):
        pr.ar(11)


def _cocoeval_recall(coco_gt, res, iou_type, max_dets):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(copy.deepcopy(res))
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.params.useCats = 0
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
    return ev.eval["recall"][:, 0]  # (T, A, M)


@needs_coco
def test_equals_cocoeval_on_shared_coco_boxes():
    gt = gt_from_coco(COCO_VAL)
    anns = list(gt.coco.anns.values())
    # perfect proposals -> AR 1 (no image has more than 100 objects)
    perfect = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0} for a in anns]
    s = evaluate_proposals(gt, perfect, progress=False)
    assert s["AR@100"] == 1.0 and s["AR@1000"] == 1.0 and s["AR_S@100"] == 1.0
    # jittered gt boxes, 8 per object, scores with many ties
    rng = np.random.default_rng(0)
    res = []
    for a in anns:
        x, y, w, h = a["bbox"]
        for _ in range(8):
            j = rng.normal(0, 0.15, 4)
            res.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "score": float(np.round(rng.random(), 1)),
                        "bbox": [x + j[0] * w, y + j[1] * h, w * np.exp(j[2]), h * np.exp(j[3])]})
    counts = [1, 10, 100, 1000]
    ref = _cocoeval_recall(gt.coco, res, "bbox", counts)
    pr = ProposalRecall(gt, res, max_count=1000, progress=False, chunk=37)
    for ai, area in enumerate(["all", "small", "medium", "large"]):
        for mi, m in enumerate(counts):
            np.testing.assert_array_equal(pr.recall(m, area), ref[:, ai, mi], err_msg=f"{area} @{m}")
    assert 0 < pr.ar(10) < pr.ar(100) < 1


@needs_coco
def test_segm_recall_with_rle_proposals_equals_cocoeval():
    from core.boxes import encode_masks

    gt = gt_from_coco(COCO_VAL)
    img_ids = sorted(gt.coco.getImgIds())[:12]
    res = []
    for iid in img_ids:
        info = gt.coco.imgs[iid]
        for k, a in enumerate(gt.coco.imgToAnns[iid]):
            m = gt.coco.annToMask(a).astype(bool)
            shifted = np.roll(m, shift=(k % 3) * 3, axis=1)  # shifted by 0, 3, 6 px
            rle = encode_masks(shifted[None])[0]  # counts as str, as stored proposals
            res.append({"image_id": str(iid), "segmentation": rle, "score": 1.0 - 0.01 * k})
            assert rle["size"] == [info["height"], info["width"]]
    pr = ProposalRecall(gt, res, iou_type="segm", max_count=100, progress=False)
    # reference: COCOeval on the same images only (restrict the gt to them)
    from pycocotools.cocoeval import COCOeval

    ref_res = [{"image_id": int(r["image_id"]), "category_id": 1, "score": r["score"],
                "segmentation": {"size": r["segmentation"]["size"],
                                 "counts": r["segmentation"]["counts"].encode()}} for r in res]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt.coco, gt.coco.loadRes(ref_res), "segm")
        ev.params.useCats = 0
        ev.params.imgIds = img_ids
        ev.params.maxDets = [10, 100]
        ev.evaluate()
        ev.accumulate()
    ref = ev.eval["recall"][:, 0]
    # ours covers all 100 images (the others are misses): rescale by the object counts of the 12 images
    n12 = sum(1 for iid in img_ids for a in gt.coco.imgToAnns[iid] if not a["iscrowd"])
    scale = n12 / pr.npig["all"]
    np.testing.assert_allclose(pr.recall(100, "all"), ref[:, 0, 1] * scale, rtol=1e-12)
    np.testing.assert_allclose(pr.recall(10, "all"), ref[:, 0, 0] * scale, rtol=1e-12)
    # unshifted masks (k % 3 == 0) are perfect: recall at IoU .95 is at least their share
    assert pr.recall(100)[-1] > 0
    # box recall from the same masks (tight boxes via toBbox) also works
    assert ProposalRecall(gt, res, iou_type="bbox", max_count=100, progress=False).ar(100) > 0
    # a mask of the wrong size names the entry
    bad = [dict(res[0], segmentation=encode_masks(np.zeros((1, 5, 5), bool))[0])]
    with pytest.raises(DataError, match="entry 0: mask size"):
        ProposalRecall(gt, bad, iou_type="segm", max_count=10, progress=False)


def test_results_from_store(tmp_path):
    from core.store import ProposalStore

    A = [10, 10, 50, 50]
    st = ProposalStore.create(tmp_path / "st", method="test", params={}, dataset="d", split="s",
                              image_ids=["a", "b"])
    # scores increasing along the ranking -> rank order must win
    st.put("a", np.array([[100, 0, 120, 20], A], np.float32), np.array([0.1, 0.9], np.float32))
    st.put("b", np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    st.finalize()
    st = ProposalStore.open(tmp_path / "st")
    res = results_from_store(st)
    assert [r["image_id"] for r in res] == ["a", "a"]
    assert res[0]["score"] > res[1]["score"]
    gt = gt_from_records([rec("a", [A]), rec("b", [])], ["x"])
    pr = ProposalRecall(gt, res, max_count=10, progress=False)
    assert pr.ar(1) == 0.0 and pr.ar(2) == 1.0
    assert len(IOU_THRESHOLDS) == 10
