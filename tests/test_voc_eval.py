"""VOC07 metric (detector/voc_eval.py): hand-worked cases, a slow devkit-style reference on random data, result
files, and real VOC annotations when ../shared/data is present."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from core.errors import DataError
from detector.voc_eval import FlatDetections, detections_by_class, eval_class, evaluate_detections, voc07_ap
from detector.voc_results import read_result_file, read_results, result_file, write_results

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC_REAL = SHARED / "voc2007-real" / "VOC2007"

G1 = [0, 0, 10, 10]  # 0-based edges: pixels 0..9 (devkit: 1,1,10,10; area 100)
G2 = [20, 20, 30, 30]
FAR = [50, 50, 60, 60]


def gt1(boxes, difficult=None, iid="a"):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    d = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return {iid: (boxes, d)}


def dets1(boxes, scores, iid="a"):
    return {iid: (np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32))}


# --------------------------------------------------------------------------------------- 11-point interpolation


def test_voc07_ap_interpolation_by_hand():
    # rec/prec in score order. max prec at rec >= t:
    # t=0, .1, .2 -> 1 (rec .2 has prec 1); t=.3(0.30000000000000004), .4 -> .6; t=.5 .. .8 -> .4; t=.9, 1 -> 0
    # AP = (3*1 + 2*.6 + 4*.4) / 11 = 5.8 / 11
    ap = voc07_ap([0.2, 0.4, 0.4, 0.8], [1.0, 0.5, 0.6, 0.4])
    assert ap == pytest.approx(5.8 / 11, abs=1e-12)


def test_voc07_ap_devkit_thresholds_quirk():
    # py-faster-rcnn uses np.arange(0., 1.1, 0.1): its 4th threshold is 0.30000000000000004, so a recall of
    # exactly 3/10 reaches only t = 0, .1, .2 -> 3/11 (not 4/11). Same for .6 and .7.
    assert voc07_ap([3 / 10], [1.0]) == pytest.approx(3 / 11)
    assert voc07_ap([4 / 10], [1.0]) == pytest.approx(5 / 11)
    assert voc07_ap([1.0], [1.0]) == pytest.approx(1.0)
    assert voc07_ap([], []) == 0.0
    assert voc07_ap([0.0, 0.0], [0.0, 0.0]) == 0.0


# -------------------------------------------------------------------------------------------- hand-made cases


def test_duplicates_and_misses():
    # gt G1, G2 (npos 2). d1 .9 = G1 -> TP; d2 .8 = G1 again -> FP (duplicate); d3 .7 far -> FP; G2 missed.
    # rec = [.5, .5, .5], prec = [1, .5, 1/3]; rec .5 reaches t = 0 .. .5 (6 thresholds) with max prec 1.
    # AP = 6/11
    gts = gt1([G1, G2])
    r = eval_class(dets1([G1, G1, FAR], [0.9, 0.8, 0.7]), gts)
    assert r.npos == 2
    assert r.tp.tolist() == [1, 0, 0] and r.fp.tolist() == [0, 1, 1]
    assert r.ap == pytest.approx(6 / 11)
    assert float(r) == r.ap


def test_difficult_hits_ignored():
    # G1 difficult, G2 normal -> npos 1. d1 .9 on G1: ignored; d2 .8 on G2: TP; d3 .7 on G1 again: ignored
    # (a taken/difficult box is not a duplicate). tp = [0,1,1], fp = [0,0,0]; prec[0] = 0/0 -> 0 (eps guard),
    # then 1, 1; rec = [0, 1, 1] -> every t has max prec 1 -> AP 1.
    gts = gt1([G1, G2], [True, False])
    r = eval_class(dets1([G1, G2, G1], [0.9, 0.8, 0.7]), gts)
    assert r.npos == 1
    assert r.tp.tolist() == [0, 1, 0] and r.fp.tolist() == [0, 0, 0]
    assert r.ap == pytest.approx(1.0)


def test_best_iou_goes_to_difficult_then_ignored():
    # A detection whose best IoU is with a difficult box is ignored even if it also overlaps a normal box > .5
    # (the devkit picks the argmax box first). G1 normal, D = [0,0,10,11] difficult (IoU with det [0,0,10,11]
    # is 1, with G1 100/110 = .909). det ignored -> no TP; G1 missed; no FP -> AP 0 (no recall at all).
    gts = gt1([G1, [0, 0, 10, 11]], [False, True])
    r = eval_class(dets1([[0, 0, 10, 11]], [0.9]), gts)
    assert r.tp.tolist() == [0] and r.fp.tolist() == [0]
    assert r.ap == 0.0


def test_iou_exactly_half_is_not_a_match():
    # gt G1 (devkit 1,1,10,10; 10x10). d1 .9 [0,0,10,5] -> devkit 1,1,10,5: 10x5 = 50, union 100 -> IoU .5,
    # not > .5 -> FP. d2 .8 [0,0,10,6] -> 60/100 = .6 -> TP.
    # per detection tp = [0,1], fp = [1,0] -> cumulated tp [0,1], fp [1,1] -> rec [0, 1], prec [0, .5]
    # -> all 11 thresholds give .5 -> AP .5
    r = eval_class(dets1([[0, 0, 10, 5], [0, 0, 10, 6]], [0.9, 0.8]), gt1([G1]))
    assert r.tp.tolist() == [0, 1] and r.fp.tolist() == [1, 0]
    assert r.ap == pytest.approx(0.5)


def test_plus_one_convention_edge_cases():
    # 1) A naive "+1 on 0-based edges" (x2 taken as inclusive) would give [0,0,10,5] vs G1 an IoU of
    #    (11*6)/(11*11) = .545 -> TP; the devkit convention after conversion gives exactly .5 -> FP (AP 0).
    assert eval_class(dets1([[0, 0, 10, 5]], [1.0]), gt1([G1])).ap == 0.0
    # 2) Boxes that share an edge share no pixel: devkit 1..10 vs 11..20 -> iw = 10 - 11 + 1 = 0.
    r = eval_class(dets1([[10, 0, 20, 10]], [1.0]), gt1([G1]))
    assert r.fp.tolist() == [1]
    # 3) Fractional box: [0.5,0,10,10] -> devkit 1.5..10 wide 9.5 -> IoU .95 -> TP, AP 1.
    assert eval_class(dets1([[0.5, 0, 10, 10]], [1.0]), gt1([G1])).ap == pytest.approx(1.0)
    # 4) A 1-pixel gt [3,3,4,4] (devkit 4,4,4,4: area 1) and the same det: IoU 1 -> TP.
    assert eval_class(dets1([[3, 3, 4, 4]], [1.0]), gt1([[3, 3, 4, 4]])).ap == pytest.approx(1.0)


def test_ties_keep_input_order():
    # Two detections with the same score: a miss then a hit (input order). Stable sort keeps that order:
    # tp [0,1], fp [1,1] -> rec [0,1], prec [0,.5] -> AP .5. Given the other way round: prec [1,.5] -> AP 1.
    gts = gt1([G1])
    assert eval_class(dets1([FAR, G1], [0.5, 0.5]), gts).ap == pytest.approx(0.5)
    assert eval_class(dets1([G1, FAR], [0.5, 0.5]), gts).ap == pytest.approx(1.0)
    # across images the dict order is the input order
    gts2 = {**gt1([G1], iid="a"), **gt1([], iid="b")}
    d = {"b": (np.array([FAR], np.float32), np.array([0.5])), "a": (np.array([G1], np.float32), np.array([0.5]))}
    assert eval_class(d, gts2).ap == pytest.approx(0.5)


def test_no_gt_and_no_dets_and_other_images():
    # detections on an image without objects of the class are FPs; no detections -> AP 0
    gts = {**gt1([G1], iid="a"), **gt1([], iid="b")}
    assert eval_class({}, gts).ap == 0.0
    # b's det .9 FP first, then a's hit: rec [0,1], prec [0,.5] -> AP .5
    d = {"a": (np.array([G1]), np.array([0.8])), "b": (np.array([G1]), np.array([0.9]))}
    assert eval_class(d, gts).ap == pytest.approx(0.5)
    # a class without non-difficult gt -> AP 0 (both devkits)
    assert eval_class(dets1([G1], [1.0]), gt1([G1], [True])).ap == 0.0
    assert eval_class(dets1([G1], [1.0]), gt1([])).ap == 0.0


def test_unknown_image_and_bad_shapes():
    with pytest.raises(DataError, match="'zzz'"):
        eval_class(dets1([G1], [1.0], iid="zzz"), gt1([G1]))
    with pytest.raises(DataError, match="boxes"):
        eval_class({"a": (np.zeros((2, 3)), np.zeros(2))}, gt1([G1]))
    with pytest.raises(DataError, match="2 boxes but 1 scores"):
        eval_class({"a": (np.zeros((2, 4)), np.zeros(1))}, gt1([G1]))
    with pytest.raises(DataError, match="non-finite"):
        eval_class({"a": (np.zeros((1, 4)), np.array([np.nan]))}, gt1([G1]))


def test_evaluate_detections_records_and_mean():
    # two classes over two images; class x: AP 6/11 (the duplicates case), class y: AP 1 -> mAP (6/11 + 1)/2
    recs = [
        SimpleNamespace(image_id="a", boxes=np.array([G1, G2, FAR], np.float32), labels=np.array([0, 0, 1]),
                        difficult=np.zeros(3, bool)),
        SimpleNamespace(image_id="b", boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                        difficult=np.zeros(0, bool)),
    ]
    dets = {"x": dets1([G1, G1, FAR], [0.9, 0.8, 0.7]), "y": dets1([FAR], [0.3])}
    res = evaluate_detections(recs, dets, classes=["x", "y"])
    assert res["ap"]["x"] == pytest.approx(6 / 11) and res["ap"]["y"] == pytest.approx(1.0)
    assert res["mAP"] == pytest.approx((6 / 11 + 1) / 2)
    # same through the gt-dict form
    gtd = {"x": {"a": (np.array([G1, G2]), np.zeros(2, bool)), "b": (np.zeros((0, 4)), np.zeros(0, bool))},
           "y": {"a": (np.array([FAR]), np.zeros(1, bool)), "b": (np.zeros((0, 4)), np.zeros(0, bool))}}
    assert evaluate_detections(gtd, dets) == res
    with pytest.raises(DataError, match="unknown class"):
        evaluate_detections(recs, {"zebra": {}}, classes=["x", "y"])
    # per-image (boxes, scores, labels) -> per class
    per_image = {"a": (np.array([G1, FAR]), np.array([0.9, 0.3]), np.array([0, 1]))}
    byc = detections_by_class(per_image, ["x", "y"])
    assert list(byc["x"]) == ["a"] and byc["y"]["a"][1].tolist() == [0.3]


# ------------------------------------------------------------------- independent slow reference, random data


def reference_devkit(dets: dict, gts: dict, thresh=0.5):
    """Straightforward loop following the devkit (py-faster-rcnn voc_eval, use_07_metric) on 1-based coords."""
    ids, conf, bb = [], [], []
    for iid, (b, s) in dets.items():
        for k in range(len(s)):
            ids.append(iid)
            conf.append(float(s[k]))
            x1, y1, x2, y2 = (float(v) for v in b[k])
            bb.append((x1 + 1, y1 + 1, x2, y2))
    recs = {}
    npos = 0
    for iid, (b, d) in gts.items():
        recs[iid] = {"bbox": [(float(x1) + 1, float(y1) + 1, float(x2), float(y2)) for x1, y1, x2, y2 in b],
                     "difficult": [bool(x) for x in d], "det": [False] * len(d)}
        npos += sum(not bool(x) for x in d)
    order = sorted(range(len(conf)), key=lambda i: -conf[i])  # Python's sort is stable
    tp, fp = [], []
    for i in order:
        R = recs[ids[i]]
        bx = bb[i]
        ovmax, jmax = -float("inf"), -1
        for j, g in enumerate(R["bbox"]):
            iw = max(min(g[2], bx[2]) - max(g[0], bx[0]) + 1.0, 0.0)
            ih = max(min(g[3], bx[3]) - max(g[1], bx[1]) + 1.0, 0.0)
            inter = iw * ih
            uni = (bx[2] - bx[0] + 1.0) * (bx[3] - bx[1] + 1.0) + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - inter
            ov = inter / uni
            if ov > ovmax:
                ovmax, jmax = ov, j
        t = f = 0.0
        if ovmax > thresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    t = 1.0
                    R["det"][jmax] = True
                else:
                    f = 1.0
        else:
            f = 1.0
        tp.append(t)
        fp.append(f)
    ctp = cfp = 0.0
    rec, prec = [], []
    for t, f in zip(tp, fp):
        ctp += t
        cfp += f
        rec.append(ctp / npos if npos else 0.0)
        prec.append(ctp / (ctp + cfp) if ctp + cfp > 0 else 0.0)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ps = [p for r, p in zip(rec, prec) if r >= t]
        ap += (max(ps) if ps else 0.0) / 11.0
    return ap, tp, fp


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    gts, dets = {}, {}
    for i in range(int(rng.integers(5, 25))):
        iid = f"{i:06d}"
        m = int(rng.integers(0, 6))
        xy = rng.integers(0, 60, (m, 2))
        wh = rng.integers(1, 40, (m, 2))
        gts[iid] = (np.hstack([xy, xy + wh]).astype(np.float32), rng.random(m) < 0.25)
        if rng.random() < 0.8:
            n = int(rng.integers(0, 12))
            src = gts[iid][0][rng.integers(0, m, n)] if m else rng.uniform(0, 80, (n, 4))
            jit = rng.integers(-6, 7, (n, 4)) if seed % 2 else np.round(rng.normal(0, 4, (n, 4)), 1)
            b = (src + jit).astype(np.float32)
            b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
            s = np.round(rng.random(n), 1)  # many ties
            dets[iid] = (b, s)
    ref_ap, ref_tp, ref_fp = reference_devkit(dets, gts)
    r = eval_class(dets, gts)
    assert r.tp.tolist() == ref_tp and r.fp.tolist() == ref_fp
    assert r.ap == pytest.approx(ref_ap, abs=1e-12)


# ------------------------------------------------------------------------------------------------ result files


def test_result_files_round_trip(tmp_path):
    gts = {**gt1([G1, G2], iid="000001"), **gt1([FAR], iid="000002")}
    dets = {"x": {"000002": (np.array([[49.5, 50, 60.5, 60]]), np.array([0.123456789])),
                  "000001": (np.array([G1, G1, G2]), np.array([0.5, 0.9, 0.5]))}}
    paths = write_results(tmp_path, "val", dets, ["x", "y"])
    assert [p.name for p in paths] == ["comp4_det_val_x.txt", "comp4_det_val_y.txt"]
    lines = paths[0].read_text().splitlines()
    assert lines[0] == "000002 0.123456789 50.5 51.0 60.5 60.0"  # 1-based: x1+1, y1+1, x2, y2; 1 decimal
    assert lines[1] == "000001 0.5 1.0 1.0 10.0 10.0"
    assert paths[1].read_text() == ""
    back = read_results(tmp_path, "val", ["x", "y"], image_ids=list(gts))
    assert isinstance(back["x"], FlatDetections) and back["x"].image_ids == ["000002", "000001", "000001", "000001"]
    np.testing.assert_allclose(back["x"].boxes[0], [49.5, 50, 60.5, 60])
    assert back["x"].scores[0] == 0.123456789
    assert len(back["y"].image_ids) == 0
    gtd = {"x": gts, "y": gts}
    assert evaluate_detections(gtd, back) == evaluate_detections(gtd, dets)


def test_result_file_errors(tmp_path):
    f = tmp_path / "comp4_det_val_x.txt"
    f.write_text("000001 0.9 1 1 10 10\n\n000001 0.8 1 1 10\n")
    with pytest.raises(DataError, match=r"comp4_det_val_x.txt:3: expected 6 fields"):
        read_result_file(f)
    f.write_text("000001 0.9 1 1 10 10\n000001 abc 1 1 10 10\n")
    with pytest.raises(DataError, match=r":2: 'abc' is not a number"):
        read_result_file(f)
    f.write_text("000001 nan 1 1 10 10\n")
    with pytest.raises(DataError, match=r":1: non-finite"):
        read_result_file(f)
    f.write_text("000001 0.9 1 1 10 10\n000777 0.9 1 1 10 10\n")
    with pytest.raises(DataError, match=r":2: image id '000777' is not in the split"):
        read_result_file(f, image_ids=["000001"])
    with pytest.raises(DataError, match="result file not found"):
        read_results(tmp_path, "val", ["x", "y"])
    (tmp_path / "comp4_det_val_y.txt").write_text("")
    (tmp_path / "comp4_det_val_zebra.txt").write_text("")
    with pytest.raises(DataError, match="unknown class 'zebra'"):
        read_results(tmp_path, "val", ["x", "y"])
    with pytest.raises(DataError, match="results folder not found"):
        read_results(tmp_path / "nope", "val", ["x"])
    assert result_file(tmp_path, "test", "cat").name == "comp4_det_test_cat.txt"


# ------------------------------------------------------------------------------------- real VOC annotations


@pytest.mark.skipif(not VOC_REAL.is_dir(), reason=f"real VOC data not present at {VOC_REAL}")
def test_real_voc_val_by_hand():
    from core.datasets import VOCDataset

    ds = VOCDataset(str(VOC_REAL), "val")
    # first val images whose objects are all of distinct classes... simply take images with >= 2 objects
    recs = []
    for i in range(len(ds)):
        r = ds[i]
        if len(r.boxes) >= 2:
            recs.append(r)
        if len(recs) == 4:
            break
    assert len(recs) == 4
    classes = list(ds.classes)
    # Detections: image 0: perfect copies of all its objects (score 1) and a duplicate of its first object
    # (score .95); image 1: every object shifted right by its full width (IoU 0 -> FP, score .9);
    # image 2: nothing (misses); image 3: perfect copies, score .5.
    per_image = {}
    r0, r1, r2, r3 = recs
    b0 = r0.boxes
    per_image[r0.image_id] = (np.vstack([b0, b0[:1]]), np.r_[np.ones(len(b0)), 0.95],
                              np.r_[r0.labels, r0.labels[:1]])
    w = r1.boxes[:, 2] - r1.boxes[:, 0]
    shifted = r1.boxes + np.stack([w, 0 * w, w, 0 * w], 1)
    per_image[r1.image_id] = (shifted, np.full(len(w), 0.9), r1.labels)
    per_image[r3.image_id] = (r3.boxes, np.full(len(r3.boxes), 0.5), r3.labels)
    dets = detections_by_class(per_image, classes)

    # By hand, per class c: let n_k = objects of class c in image k (no difficult objects in this data),
    # npos = n0+n1+n2+n3; score order: image 0 copies (n0 TPs), duplicate (FP, only if c is r0's first class),
    # image 1 shifted (n1 FPs; can a shifted box overlap another object of c by > .5? checked below), image 3
    # copies (n3 TPs). Compute the devkit AP from that sequence.
    def by_hand(c):
        n = [int((r.labels == c).sum()) for r in recs]
        npos = sum(n)
        seq = [1] * n[0] + ([0] if r0.labels[0] == c else []) + [0] * n[1] + [1] * n[3]
        if npos == 0:
            return 0.0
        tp = np.cumsum(seq)
        fp = np.cumsum([1 - s for s in seq])
        rec, prec = tp / npos, tp / np.maximum(tp + fp, 1e-300)
        return voc07_ap(rec, prec)

    # the shifted boxes must miss every gt of their class (otherwise the by-hand sequence is wrong)
    from core.boxes import box_iou
    for c in np.unique(r1.labels):
        s = shifted[r1.labels == c]
        g = r1.boxes[r1.labels == c]
        assert box_iou(s, g).max() <= 0.5

    res = evaluate_detections(recs, dets, classes=classes)
    for ci, c in enumerate(classes):
        assert res["ap"][c] == pytest.approx(by_hand(ci)), c
    # a class present only in image 0 (all perfect, + maybe the duplicate after them) gets AP 1
    present = {int(c) for r in recs for c in r.labels}
    for ci in present:
        if all(int((r.labels == ci).sum()) == 0 for r in recs[1:]):
            assert res["ap"][classes[ci]] == pytest.approx(1.0)
    for ci in set(range(len(classes))) - present:
        assert res["ap"][classes[ci]] == 0.0
    # the case is not trivial: some class has an AP strictly between 0 and 1
    assert any(0 < v < 1 for v in res["ap"].values())
