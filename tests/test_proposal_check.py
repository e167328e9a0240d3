"""The proposal-file checker (proposals/check.py): files made wrong on purpose from a clean store (shifted by one,
1-based, x/y swapped, x y w h, resized-image coordinates, shuffled scores, unknown ids, ...) are each named with the
right code, refused or warned as documented, and read correctly with the options the checker suggests; a clean file
has an empty diagnosis. SelectiveSearch (integer boxes) and random boxes (float boxes) of the synthetic test split."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.store import ProposalStore
from proposals.conventions import frame_scales
from proposals.writers import write_proposal_file
from proposals.importing import import_proposals
from test_import_proposals import imp, make_data
from test_robustness_common import assert_ok, assert_user_error


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_data):
    return make_data(tmp_path_factory.mktemp("chk"), tiny_data)


def _entries(data, which):
    st = data[which]
    return [(i, st.get(i).boxes.astype(np.float64), st.get(i).scores.astype(np.float64)) for i in st.image_ids]


def _size(data, i):
    r = data["ds"].get(i)
    return r.width, r.height


def _scale(data, i, frame):
    w, h = _size(data, i)
    return float(frame_scales(np.array([w]), np.array([h]), frame)[0])


# name -> (make the wrong entries from clean (id, boxes, scores), the codes expected, refused?, options that fix it)
def _wrong(data, which):
    rng = np.random.default_rng(0)
    E = _entries(data, which)
    first = E[0][0]

    def outside(i, b, s):  # 5% of the boxes pushed 20 px beyond the right border
        b = b.copy()
        k = np.arange(len(b)) % 20 == 7
        b[k, 2] = _size(data, i)[0] + 20 + np.arange(k.sum())  # distinct: no duplicates made
        return b, s

    def degenerate(i, b, s):
        b = b.copy()
        k = np.arange(len(b)) % 25 == 3
        b[k, 2] = b[k, 0]
        return b, s

    return {
        "shifted_by_one": ([(i, b + 1, s) for i, b, s in E], {"one_based"}, True, ["--base", "edges1"]),
        "one_based_pixels": ([(i, b + [1, 1, 0, 0], s) for i, b, s in E], {"one_based"}, True,
                             ["--base", "pixels1"]),
        "inclusive_ends": ([(i, b - [0, 0, 1, 1], s) for i, b, s in E], {"end_offset"}, True,
                           ["--base", "pixels0"]),
        "swapped_axes": ([(i, b[:, [1, 0, 3, 2]], s) for i, b, s in E], {"yxyx"}, True, ["--layout", "yxyx"]),
        "xywh": ([(i, np.c_[b[:, :2], b[:, 2:] - b[:, :2]], s) for i, b, s in E], {"xywh"}, True,
                 ["--layout", "xywh"]),
        "resized_600": ([(i, b * _scale(data, i, (600, 1000)), s) for i, b, s in E], {"resized"}, True,
                        ["--resized", "600,1000"]),
        "resized_800": ([(i, b * _scale(data, i, (800, 1333)), s) for i, b, s in E], {"resized"}, True,
                        ["--resized", "800,1333"]),
        "one_based_and_xywh": ([(i, np.c_[b[:, :2] + 1, b[:, 2:] - b[:, :2]], s) for i, b, s in E],
                               {"xywh", "one_based"}, True, ["--layout", "xywh", "--base", "edges1"]),
        "shuffled_scores": ([(i, b, rng.permutation(s)) for i, b, s in E], {"unsorted"}, False, None),
        "constant_scores": ([(i, b, np.ones_like(s)) for i, b, s in E], {"missing_scores"}, False, None),
        "unknown_ids": ([(("nope_" + i) if i == first else i, b, s) for i, b, s in E],
                        {"unknown_ids", "missing_ids"}, True, None),
        "duplicates": ([(i, np.r_[b, b[:10]], np.r_[s, s[:10] - 2]) for i, b, s in E], {"duplicates"}, False, None),
        "outside": ([(i, *outside(i, b, s)) for i, b, s in E], {"outside"}, False, None),
        "degenerate": ([(i, *degenerate(i, b, s)) for i, b, s in E], {"degenerate"}, False, None),
    }


CASES = ["shifted_by_one", "one_based_pixels", "inclusive_ends", "swapped_axes", "xywh", "resized_600",
         "resized_800", "one_based_and_xywh", "shuffled_scores", "constant_scores", "unknown_ids", "duplicates",
         "outside", "degenerate"]


def _write_npz(entries, path):
    # write_proposal_file's npz is x1 y1 x2 y2 as given: the wrong numbers land in the file unchanged
    write_proposal_file([(i, b, s, None) for i, b, s in entries], path, "npz")


@pytest.mark.parametrize("which", ["ss", "rnd"])
def test_clean_files_have_an_empty_diagnosis(data, tmp_path, which):
    _write_npz(_entries(data, which), tmp_path / "clean.npz")
    r = import_proposals(tmp_path / "clean.npz", data["ds"], check_only=True, progress=False)
    assert r.report.diagnosis == [] and r.report.suggested_args() == [], r.report.as_dict()
    assert r.report.stats["fit_image_frame"] == 1.0


@pytest.mark.parametrize("which", ["ss", "rnd"])
@pytest.mark.parametrize("case", CASES)
def test_wrong_files_are_named(data, tmp_path, which, case):
    entries, codes, refused, fix = _wrong(data, which)[case]
    _write_npz(entries, tmp_path / f"{case}.npz")
    res, js = imp(data, tmp_path / f"{case}.npz", tmp_path / "st", "--check-only")
    assert set(js["diagnosis"]) == codes, js
    if refused:
        assert_user_error(res, "refuses", *sorted(set(js["refused"])))
        assert set(js["refused"]) & codes
    else:
        assert_ok(res)
        assert js["refused"] == []
    if fix is not None:
        assert js["suggested_args"] == fix
        # read with the suggested options, the file is clean and gives back the original boxes
        res, js = imp(data, tmp_path / f"{case}.npz", tmp_path / "st", *fix)
        assert_ok(res)
        assert js["diagnosis"] == [], js
        st, src = ProposalStore.open(tmp_path / "st"), data[which]
        for i in src.image_ids:
            np.testing.assert_allclose(st.get(i).boxes, src.get(i).boxes, atol=2e-3)


def test_refusal_on_import_and_force(data, tmp_path):
    """A refused file is not imported (exit 2, one error line naming the code and the fix, the JSON report still the
    last stdout line); --force imports it as read."""
    entries, *_ = _wrong(data, "ss")["swapped_axes"]
    _write_npz(entries, tmp_path / "yx.npz")
    res, js = imp(data, tmp_path / "yx.npz", tmp_path / "st")
    assert_user_error(res, "yx.npz", "yxyx", "--layout yxyx")
    assert js["diagnosis"] == ["yxyx"] and js["store"] is None and not (tmp_path / "st").exists()
    assert "REFUSED" in res.out and "fix: --layout yxyx" in res.out
    res, js = imp(data, tmp_path / "yx.npz", tmp_path / "st", "--force")
    assert_ok(res)
    st = ProposalStore.open(tmp_path / "st")
    assert st.meta["params"]["imported"]["forced"] is True
    assert "yxyx" in json.loads((tmp_path / "st" / "import.json").read_text())["report"]["refused"]


def test_warned_corrections_on_import(data, tmp_path):
    """outside: clipped to the image; degenerate: dropped; duplicates: kept."""
    cases = _wrong(data, "rnd")
    src = data["rnd"]
    _write_npz(cases["outside"][0], tmp_path / "o.npz")
    res, js = imp(data, tmp_path / "o.npz", tmp_path / "o")
    assert_ok(res)
    assert js["diagnosis"] == ["outside"] and js["boxes_clipped"] > 0
    st = ProposalStore.open(tmp_path / "o")
    for i in src.image_ids:
        assert st.get(i).boxes[:, 2].max() <= _size(data, i)[0]
    _write_npz(cases["degenerate"][0], tmp_path / "d.npz")
    res, js = imp(data, tmp_path / "d.npz", tmp_path / "d")
    assert_ok(res)
    n_src = sum(len(src.get(i)) for i in src.image_ids)
    assert js["boxes_dropped"] > 0 and js["boxes_stored"] == n_src - js["boxes_dropped"]
    _write_npz(cases["duplicates"][0], tmp_path / "u.npz")
    res, js = imp(data, tmp_path / "u.npz", tmp_path / "u")
    assert_ok(res)
    assert js["boxes_stored"] == n_src + 10 * len(src.image_ids)


def test_format_conventions_are_checked_too(data, tmp_path):
    """Each format's own convention is the reference: an R-CNN .mat holding 0-based x1 y1 x2 y2 boxes is named
    (zero_based plus, on non-square images, swapped axes), a COCO json with x1 y1 x2 y2 in 'bbox' is 'xyxy', and an
    npz without scores is 'missing_scores'."""
    import scipy.io

    E = _entries(data, "ss")
    ids = np.empty(len(E), dtype=object)
    cells = np.empty(len(E), dtype=object)
    for k, (i, b, _s) in enumerate(E):
        ids[k], cells[k] = i, b  # 0-based x1 y1 x2 y2 where [y1 x1 y2 x2] 1-based belongs
    scipy.io.savemat(tmp_path / "r.mat", {"images": ids, "boxes": cells})
    res, js = imp(data, tmp_path / "r.mat", tmp_path / "st", "--check-only")
    assert js["format"] == "rcnn_mat" and set(js["diagnosis"]) == {"xyxy", "zero_based"}, js
    assert js["suggested_args"] == ["--layout", "xyxy", "--base", "edges0"]
    res, js = imp(data, tmp_path / "r.mat", tmp_path / "st", "--layout", "xyxy", "--base", "edges0")
    assert_ok(res)
    assert js["diagnosis"] == []

    coco = [{"image_id": i, "bbox": [float(v) for v in b[k]], "score": float(s[k])}
            for i, b, s in E for k in range(len(b))]
    (tmp_path / "c.json").write_text(json.dumps(coco))
    res, js = imp(data, tmp_path / "c.json", tmp_path / "st2", "--check-only")
    assert set(js["diagnosis"]) == {"xyxy"} and js["suggested_args"] == ["--layout", "xyxy"], js

    np.savez(tmp_path / "n.npz", image_ids=np.array([i for i, *_ in E]), boxes=np.concatenate([b for _, b, _ in E]),
             counts=np.array([len(b) for _, b, _ in E]))
    res, js = imp(data, tmp_path / "n.npz", tmp_path / "st3")
    assert_ok(res)
    assert js["diagnosis"] == ["missing_scores"]
    st = ProposalStore.open(tmp_path / "st3")
    np.testing.assert_array_equal(st.get(E[0][0]).boxes, E[0][1].astype(np.float32))


def test_square_images_cannot_tell_swapped_axes(data, tmp_path):
    """On square images x/y swapped boxes look right: no code, a note says it cannot be told."""
    from proposals.check import check_proposals
    from proposals.formats import RawImage

    rng = np.random.default_rng(1)
    images, sizes = {}, {}
    for k in range(4):
        xy = rng.uniform(0, 60, (50, 2))
        b = np.c_[xy, np.minimum(xy + rng.uniform(5, 60, (50, 2)), 100)]
        b[0] = [0, 0, 100, 100]
        images[f"i{k}"], sizes[f"i{k}"] = RawImage(b[:, [1, 0, 3, 2]], np.linspace(1, 0, 50)), (100, 100)
    rep = check_proposals(images, sizes, layout="xyxy", base="edges0")
    assert rep.diagnosis == [] and any("square" in n for n in rep.notes)
