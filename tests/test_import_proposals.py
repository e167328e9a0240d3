"""pipelines.import_proposals: every format round-trips a store of this project (identical boxes, identical recall),
the imported store feeds evaluate / train_detector / test_detector / sweep, pickles are loaded safely, and bad
input is one 'error:' line with exit code 2. Data: the synthetic generator at 128 px (4 + 4 images), a
SelectiveSearch store (integer boxes) and a random-box store (float boxes) of its test split."""
from __future__ import annotations

import json
import pickle
import sys
import types

import numpy as np
import pytest

from core.config import Config, RandomConfig, SSConfig, save_config
from core.datasets import VOCDataset
from core.store import ProposalStore
from proposals import build_proposer, extract_proposals, is_imported, known_method
from proposals.formats import FORMATS
from proposals.writers import write_proposal_file
from proposals.recall import evaluate_proposals, gt_from_records, results_from_store
from test_robustness_common import assert_ok, assert_user_error, run_entry


def make_data(root, shapes):
    """Stores of the test split (4 images of 128 px) of the synthetic set ``shapes``: 'ss' (SelectiveSearch, top
    300) and 'rnd' (random boxes, top 300)."""
    voc = shapes / "VOC2007"
    ds = VOCDataset(voc, "test")
    cfg = Config(ss=SSConfig(top_n=300, seed=0), random=RandomConfig(top_n=300))
    stores = {m: extract_proposals(cfg, name, ds, root / f"{m}_test", progress=False)
              for m, name in (("ss", "selective_search"), ("rnd", "random"))}
    return {"root": root, "voc": voc, "ds": ds, **stores}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_data):
    return make_data(tmp_path_factory.mktemp("imp"), tiny_data)


FILE = {"coco": "p.json", "rcnn_mat": "p.mat", "hosang_mat": "hosang", "detectron2": "p.pkl", "mmdet": "mm.pkl",
        "npz": "p.npz"}


def imp(data, file, out, *extra, split="test"):
    res = run_entry("pipelines.import_proposals", [file, "--voc", data["voc"], "--split", split, "--out", out,
                                                   "--no-progress", *extra])
    return res, (json.loads(res.out.strip().splitlines()[-1]) if res.out.strip() else None)


def _same_recall(data, a, b):
    gt = gt_from_records(data["ds"], data["ds"].classes)
    ra = evaluate_proposals(gt, results_from_store(a), counts=(10, 100, 300), progress=False)
    rb = evaluate_proposals(gt, results_from_store(b), counts=(10, 100, 300), progress=False)
    assert json.dumps(ra) == json.dumps(rb)  # NaN (no large objects) compares equal as text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["ss", "rnd"])
def test_round_trip_every_format(data, tmp_path, fmt, which):
    """store -> --export FORMAT -> import: the same boxes in the same order, the same recall, a clean diagnosis,
    and a store like every other (same dataset and split, complete, method imported:<name>)."""
    src = data[which]
    file = tmp_path / FILE[fmt]
    assert_ok(run_entry("pipelines.import_proposals", ["--export", src.path, file, "--format", fmt]))
    res, js = imp(data, file, tmp_path / "st", "--name", f"{which}-{fmt}")  # --format auto
    assert_ok(res)
    assert js["format"] == fmt and js["diagnosis"] == [] and js["refused"] == []
    st = ProposalStore.open(tmp_path / "st")
    assert st.method == f"imported:{which}-{fmt}" and is_imported(st.method) and known_method(st.method)
    assert st.meta["dataset"] == src.meta["dataset"] and st.meta["split"] == "test"
    assert st.image_ids == src.image_ids and st.meta["complete"] and not st.has_masks
    assert st.meta["params"]["imported"]["format"] == fmt and len(st.meta["params"]["imported"]["sha1"]) == 40
    for i in src.image_ids:
        a, b = src.get(i), st.get(i)
        np.testing.assert_array_equal(b.boxes, a.boxes)
        assert b.boxes.dtype == np.float32 and np.all(np.diff(b.scores) <= 0)
        if fmt != "rcnn_mat":  # rcnn_mat has no scores: rank scores 1 - r/n replace them (same order)
            np.testing.assert_array_equal(b.scores, a.scores)
    _same_recall(data, src, st)
    report = json.loads((tmp_path / "st" / "import.json").read_text())
    assert report["report"]["diagnosis"] == [] and report["boxes_stored"] == sum(len(src.get(i)) for i in st.image_ids)
    # importing the same file again writes nothing; another file into the same store is refused
    res, js = imp(data, file, tmp_path / "st", "--name", f"{which}-{fmt}")
    assert_ok(res)
    assert js["skipped"] is True
    res, _ = imp(data, file, tmp_path / "st", "--name", "other")
    assert_user_error(res, "different method")


def test_hosang_single_file_and_ids_in_other_forms(data, tmp_path):
    """One .mat with images / boxes / scores cells (the hosang_mat single-file layout); COCO ids given as ints
    (000005 -> 5) and as file names are matched to the split."""
    import scipy.io

    src = data["ss"]
    ids = np.empty(len(src.image_ids), dtype=object)
    boxes = np.empty(len(src.image_ids), dtype=object)
    scores = np.empty(len(src.image_ids), dtype=object)
    for k, i in enumerate(src.image_ids):
        p = src.get(i)
        ids[k], boxes[k] = i, p.boxes.astype(np.float64) + [1, 1, 0, 0]
        scores[k] = p.scores.astype(np.float64)[:, None]
    scipy.io.savemat(tmp_path / "all.mat", {"images": ids, "boxes": boxes, "scores": scores})
    res, js = imp(data, tmp_path / "all.mat", tmp_path / "st")
    assert_ok(res)
    assert js["format"] == "hosang_mat" and js["diagnosis"] == []
    st = ProposalStore.open(tmp_path / "st")
    assert st.method == "imported:all"
    for i in src.image_ids:
        np.testing.assert_array_equal(st.get(i).boxes, src.get(i).boxes)

    entries = [(i, src.get(i).boxes, src.get(i).scores, None) for i in src.image_ids]
    write_proposal_file(entries, tmp_path / "c.json", "coco")
    res_json = json.loads((tmp_path / "c.json").read_text())
    odd = set(src.image_ids[1::2])
    for r in res_json:  # one image in two forms would be an error naming both
        r["image_id"] = int(r["image_id"]) if r["image_id"] in odd else f"JPEGImages/{r['image_id']}.jpg"
    (tmp_path / "c.json").write_text(json.dumps(res_json))
    res, js = imp(data, tmp_path / "c.json", tmp_path / "st2", "--check-only")
    assert_ok(res)
    assert js["diagnosis"] == [] and js["store"] is None and not (tmp_path / "st2").exists()
    assert any("integer value" in n for n in js["notes"]) and any("file stem" in n for n in js["notes"])


def test_coco_masks_are_imported(data, tmp_path):
    """A COCO results json with RLE segmentations gives a store with masks (segm recall reads them)."""
    from core.boxes import encode_masks

    src = data["ss"]
    entries = []
    for i in src.image_ids:
        r = data["ds"].get(i)
        p = src.get(i, top=20)
        m = np.zeros((len(p.boxes), r.height, r.width), bool)
        for k, (x1, y1, x2, y2) in enumerate(p.boxes.astype(int)):
            m[k, y1:y2, x1:x2] = True
        entries.append((i, p.boxes, p.scores, encode_masks(m)))
    write_proposal_file(entries, tmp_path / "m.json", "coco")
    res, js = imp(data, tmp_path / "m.json", tmp_path / "st")
    assert_ok(res)
    st = ProposalStore.open(tmp_path / "st")
    assert st.has_masks and js["has_masks"]
    for (i, b, _s, m) in entries:
        p = st.get(i)
        np.testing.assert_array_equal(p.boxes, b)
        assert [x["counts"] for x in p.masks] == [x["counts"].decode() if isinstance(x["counts"], bytes)
                                                  else x["counts"] for x in m]


def test_pickles_are_loaded_without_running_code(data, tmp_path):
    """A pickle that would run code is refused (naming what it holds and --trust-pickle) and runs nothing; a
    detectron2 file with BoxMode.XYWH_ABS (pickled by detectron2's class) loads without detectron2."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    src = data["ss"]
    obj = {"ids": list(src.image_ids), "boxes": [src.get(i).boxes for i in src.image_ids],
           "objectness_logits": [src.get(i).scores for i in src.image_ids], "evil": Evil()}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(obj))
    res, _ = imp(data, tmp_path / "evil.pkl", tmp_path / "st", "--format", "detectron2")
    assert_user_error(res, "evil.pkl", "--trust-pickle", "system")
    assert not marker.exists()

    # detectron2's BoxMode enum, pickled from a stand-in module of the same name
    import enum

    mod = types.ModuleType("detectron2.structures.boxes")

    class BoxMode(enum.IntEnum):
        XYXY_ABS = 0
        XYWH_ABS = 1

    BoxMode.__module__, BoxMode.__qualname__ = mod.__name__, "BoxMode"
    mod.BoxMode = BoxMode
    saved = {k: sys.modules.get(k) for k in ("detectron2", "detectron2.structures", mod.__name__)}
    sys.modules.update({"detectron2": types.ModuleType("detectron2"),
                        "detectron2.structures": types.ModuleType("detectron2.structures"), mod.__name__: mod})
    try:
        xywh = [np.c_[b[:, :2], b[:, 2:] - b[:, :2]] for b in obj["boxes"]]
        blob = pickle.dumps({"ids": obj["ids"], "boxes": xywh, "objectness_logits": obj["objectness_logits"],
                             "bbox_mode": BoxMode.XYWH_ABS})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    (tmp_path / "d2.pkl").write_bytes(blob)
    res, js = imp(data, tmp_path / "d2.pkl", tmp_path / "st")
    assert_ok(res)
    assert js["format"] == "detectron2" and js["layout"] == "xywh" and js["diagnosis"] == []
    st = ProposalStore.open(tmp_path / "st")
    for i in src.image_ids:
        np.testing.assert_allclose(st.get(i).boxes, src.get(i).boxes, atol=1e-4)

    # a harmless object outside the allowed set: refused by default, loaded with --trust-pickle
    import fractions

    obj2 = {"ids": obj["ids"], "boxes": obj["boxes"], "objectness_logits": obj["objectness_logits"],
            "note": fractions.Fraction(1, 3)}
    (tmp_path / "frac.pkl").write_bytes(pickle.dumps(obj2))
    res, _ = imp(data, tmp_path / "frac.pkl", tmp_path / "st3")
    assert_user_error(res, "fractions.Fraction", "--trust-pickle")
    res, js = imp(data, tmp_path / "frac.pkl", tmp_path / "st3", "--trust-pickle")
    assert_ok(res)
    assert js["diagnosis"] == []


def test_ids_and_bad_input(data, tmp_path):
    src = data["ss"]
    entries = [(i, src.get(i).boxes, src.get(i).scores, None) for i in src.image_ids]
    # an image of the split absent from the file: refused; --allow-missing stores it with no proposals
    write_proposal_file(entries[1:], tmp_path / "part.npz", "npz")
    res, js = imp(data, tmp_path / "part.npz", tmp_path / "st")
    assert_user_error(res, "missing_ids", "--allow-missing")
    assert js["diagnosis"] == ["missing_ids"] and js["store"] is None and not (tmp_path / "st").exists()
    res, js = imp(data, tmp_path / "part.npz", tmp_path / "st", "--allow-missing")
    assert_ok(res)
    assert js["diagnosis"] == ["missing_ids"] and js["refused"] == []
    st = ProposalStore.open(tmp_path / "st")
    assert len(st.get(src.image_ids[0])) == 0 and len(st.get(src.image_ids[1])) == len(src.get(src.image_ids[1]))
    write_proposal_file(entries[1:], tmp_path / "part.json", "coco")  # COCO cannot list an image with no proposals
    res, js = imp(data, tmp_path / "part.json", tmp_path / "stc", "--check-only")
    assert js["refused"] == ["missing_ids"] and any("--allow-missing" in n for n in js["notes"])
    # mmdet is matched by position: another length is refused
    write_proposal_file(entries[:3], tmp_path / "mm.pkl", "mmdet")
    res, js = imp(data, tmp_path / "mm.pkl", tmp_path / "st2")
    assert_user_error(res, "missing_ids")
    write_proposal_file(entries + entries[:1], tmp_path / "mm5.pkl", "mmdet")
    res, js = imp(data, tmp_path / "mm5.pkl", tmp_path / "st2")
    assert_user_error(res, "unknown_ids")
    # a file for another split altogether
    res, js = imp(data, tmp_path / "part.npz", tmp_path / "st2", split="trainval")
    assert_user_error(res, "unknown_ids")
    assert "unknown_ids" in js["refused"]
    # unreadable or unknown files, bad options: one line, exit 2
    (tmp_path / "x.txt").write_text("1 2 3 4\n")
    assert_user_error(imp(data, tmp_path / "x.txt", tmp_path / "st2")[0], "x.txt", "--format")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    assert_user_error(imp(data, tmp_path / "bad.json", tmp_path / "st2")[0], "bad.json", "COCO results list")
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 nothing")
    assert_user_error(imp(data, tmp_path / "bad.mat", tmp_path / "st2")[0], "bad.mat")
    assert_user_error(imp(data, tmp_path / "nope.npz", tmp_path / "st2")[0], "nope.npz", "not found")
    assert_user_error(imp(data, tmp_path / "part.npz", tmp_path / "st2", "--resized", "big")[0], "--resized")
    assert_user_error(imp(data, tmp_path / "part.npz", tmp_path / "st2", "--name", "a b")[0], "--name")
    np.savez(tmp_path / "nan.npz", image_ids=np.array(src.image_ids), boxes=np.full((4, 4), np.nan),
             counts=np.ones(4, np.int64))
    assert_user_error(imp(data, tmp_path / "nan.npz", tmp_path / "st2")[0], "nan.npz", "NaN")
    assert_user_error(run_entry("pipelines.import_proposals", ["--export", src.path, tmp_path / "e.json"]),
                      "--export needs --format")
    # imported methods are not computed by this project
    with pytest.raises(Exception, match="import_proposals"):
        build_proposer("imported:x", Config())
    assert not is_imported("imported:") and not known_method("imported:a b") and known_method("deepmask")


def test_ranking_by_score_or_file_order(data, tmp_path):
    """Scores that rise along the file: warned 'unsorted'; the store is ranked by score, or keeps the file order
    with --rank-by order (scores replaced by rank scores)."""
    src = data["ss"]
    i0 = src.image_ids[0]
    rev = [(i, src.get(i).boxes[::-1], src.get(i).scores[::-1], None) for i in src.image_ids]
    write_proposal_file(rev, tmp_path / "rev.npz", "npz")
    res, js = imp(data, tmp_path / "rev.npz", tmp_path / "a")
    assert_ok(res)
    assert js["diagnosis"] == ["unsorted"] and js["refused"] == []
    np.testing.assert_array_equal(ProposalStore.open(tmp_path / "a").get(i0).boxes, src.get(i0).boxes)
    res, js = imp(data, tmp_path / "rev.npz", tmp_path / "b", "--rank-by", "order")
    assert_ok(res)
    b = ProposalStore.open(tmp_path / "b").get(i0)
    np.testing.assert_array_equal(b.boxes, src.get(i0).boxes[::-1])
    assert np.all(np.diff(b.scores) < 0)


def _sets(items):
    return [a for s in items for a in ("--set", s)]


TINY_DET = ["detector.trunk=small", "detector.pretrained=", "detector.fc_dim=32", "detector.scales=[64]",
            "detector.test_scale=64", "detector.max_size=128", "detector.workers=0", "detector.iters=2",
            "detector.checkpoint_every=2", "detector.train_top=0", "detector.lr_steps=[1]"]


def test_imported_stores_feed_the_entry_points(data, tmp_path):
    """An imported store is read by pipelines.evaluate proposals (with --plot), train_detector, test_detector and
    sweep --methods imported:NAME (which writes recall_iou.png beside recall.png)."""
    import torch

    torch.set_num_threads(1)
    root, voc = data["root"], data["voc"]
    run = tmp_path / "run"
    train_ds = VOCDataset(voc, "trainval")
    cfg = Config(random=RandomConfig(top_n=60))
    rnd_train = extract_proposals(cfg, "random", train_ds, root / "rnd_trainval_for_det", progress=False)
    for split, st in (("trainval", rnd_train), ("test", data["rnd"])):
        f = tmp_path / f"mine_{split}.json"
        assert_ok(run_entry("pipelines.import_proposals", ["--export", st.path, f, "--format", "coco"]))
        res, js = imp(data, f, run / "proposals" / f"imported:mine_{split}", "--name", "mine", split=split)
        assert_ok(res)
    store_test = run / "proposals" / "imported:mine_test"
    res = run_entry("pipelines.evaluate", ["proposals", "--voc", voc, "--split", "test", "--proposals", store_test,
                                           "--proposals", data["ss"].path, "--plot", tmp_path / "loc.png",
                                           "--no-sizes"])
    assert_ok(res)
    out = json.loads(res.out.strip().splitlines()[-1])
    assert set(out["methods"]) == {"imported:mine", "selective_search"}
    assert (tmp_path / "loc.png").stat().st_size > 10000

    from core.config import load_config

    cfg = load_config(None, [*TINY_DET, f"data.voc={voc}", "sweep.counts=[10,50]", f"out_dir={tmp_path}",
                             "name=run"])
    save_config(cfg, run / "config.yaml")
    det = run / "detector_imported:mine"
    assert_ok(run_entry("pipelines.train_detector", ["--config", run / "config.yaml", "--proposals",
                                                     run / "proposals" / "imported:mine_trainval", "--out", det,
                                                     "--no-progress"]))
    res = run_entry("pipelines.test_detector", ["--checkpoint", det / "final.pt", "--proposals", store_test,
                                                "--top", "10,50", "--out", tmp_path / "res", "--no-progress"])
    assert_ok(res)
    assert set(json.loads(res.out.strip().splitlines()[-1])["mAP"]) == {"10", "50"}
    res = run_entry("pipelines.sweep", ["--run", run, "--methods", "imported:mine"])
    assert_ok(res)
    summary = json.loads((run / "sweep.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"imported:mine"}
    recall = json.loads((run / "recall.json").read_text())
    loc = recall["localization"]["imported:mine"]
    assert loc["iou"][0] == 0.5 and loc["iou"][-1] == 1.0 and set(loc["recall_vs_iou"]) == {"10"}
    assert len(loc["AR"]) == len(loc["counts"]) == len(loc["recall@0.5"]) == len(loc["recall@0.7"])
    assert loc["AR"] == recall["box"]["imported:mine"]["AR"]
    for name in ("figure5.png", "recall.png", "recall_iou.png"):
        assert (run / name).stat().st_size > 10000, name
    assert "mine (imported)" in res.out or "imported:mine" in res.out
    # a sweep under other test settings keeps the earlier one's outputs (stale/sweep-<key>/), never overwrites them;
    # the same settings again recompute in place
    before = (run / "sweep.json").read_text()
    args = ["--run", run, "--methods", "imported:mine", "--set", "detector.score_thresh=0.5"]
    assert_ok(run_entry("pipelines.sweep", args))
    stale = list((run / "stale").iterdir())
    assert len(stale) == 1 and stale[0].name.startswith("sweep-standalone-")
    assert (stale[0] / "sweep.json").read_text() == before and (stale[0] / "results").is_dir()
    assert (run / "sweep.json").is_file() and (run / "figure5.png").is_file()
    assert_ok(run_entry("pipelines.sweep", args))
    assert list((run / "stale").iterdir()) == stale


def test_figure5_survives_the_round_trip_of_every_format(data, tmp_path):
    """The SelectiveSearch stores of both splits exported to each format and imported back: the detectors trained
    on them have the same weights as the one trained on the original, and the sweep gives the same Figure 5 and
    recall for every method."""
    import torch

    from core.config import load_config
    from detector.train import train_detector

    torch.set_num_threads(1)
    voc, run = data["voc"], tmp_path / "run"
    train_ds = VOCDataset(voc, "trainval")
    cfg = load_config(None, [*TINY_DET, f"data.voc={voc}", "sweep.counts=[10,50,300]", f"out_dir={tmp_path}",
                             "name=run", "ss.top_n=300", "ss.seed=0", "detector.score_thresh=0"])
    save_config(cfg, run / "config.yaml")
    stores = {"trainval": extract_proposals(cfg, "selective_search", train_ds,
                                            run / "proposals" / "selective_search_trainval", progress=False),
              "test": extract_proposals(cfg, "selective_search", data["ds"], run / "proposals" / "selective_search_test",
                                        progress=False)}
    methods = ["selective_search"]
    for fmt in FORMATS:
        name = f"ss-{fmt}"
        for split, st in stores.items():
            f = tmp_path / f"{split}_{FILE[fmt]}"
            assert_ok(run_entry("pipelines.import_proposals", ["--export", st.path, f, "--format", fmt]))
            res, js = imp(data, f, run / "proposals" / f"imported:{name}_{split}", "--name", name, split=split)
            assert_ok(res)
            assert js["diagnosis"] == []
        methods.append(f"imported:{name}")
    weights = {}
    for m in methods:
        out = train_detector(cfg, run / "proposals" / f"{m}_trainval", train_ds, run / f"detector_{m}",
                             progress=False)
        weights[m] = torch.load(out["final"], map_location="cpu", weights_only=True)["model"]
    for m in methods[1:]:
        for k, v in weights["selective_search"].items():
            assert torch.equal(weights[m][k], v), (m, k)
    assert_ok(run_entry("pipelines.sweep", ["--run", run, "--methods", ",".join(methods)]))
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    curve = {m: [{k: v for k, v in r.items() if k != "method"} for r in rows if r["method"] == m] for m in methods}
    assert [r["N"] for r in curve["selective_search"]] == [10, 50, 300]
    # a curve that depends on the proposals (score_thresh 0: the barely trained detectors still detect)
    assert all(r["ap"] for r in curve["selective_search"]) and any(r["mAP"] > 0 for r in curve["selective_search"])
    recall = json.loads((run / "recall.json").read_text())["box"]
    for m in methods[1:]:
        assert curve[m] == curve["selective_search"], m
        assert recall[m] == recall["selective_search"], m
