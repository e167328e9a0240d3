import numpy as np
import pytest

from core.boxes import encode_masks
from core.errors import DataError
from core.store import ProposalStore, merge_stores


def _props(rng, n, h=12, w=15):
    boxes = rng.uniform(0, 10, (n, 4)).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    masks = rng.random((n, h, w)) > 0.5
    return boxes, np.sort(rng.random(n).astype(np.float32))[::-1], encode_masks(masks), masks


def _create(path, ids, **kw):
    return ProposalStore.create(path, method="m", params={"a": 1}, dataset="ds", split="s", image_ids=ids, **kw)


def test_roundtrip_and_top_n(tmp_path):
    rng = np.random.default_rng(0)
    s = _create(tmp_path / "st", ["x", "y/z"], has_masks=True)
    data = {i: _props(rng, n) for i, n in (("x", 7), ("y/z", 0))}
    for i, (b, sc, rl, _) in data.items():
        s.put(i, b, sc, rl)
    s.finalize()
    r = ProposalStore.open(tmp_path / "st")
    assert r.meta["complete"] and r.image_ids == ["x", "y/z"] and r.has_masks
    full = r.get("x")
    np.testing.assert_array_equal(full.boxes, data["x"][0])
    top = r.get("x", top=3)
    np.testing.assert_array_equal(top.boxes, full.boxes[:3])
    np.testing.assert_array_equal(top.scores, full.scores[:3])
    assert top.masks == full.masks[:3] == data["x"][2][:3]
    assert len(r.get("y/z")) == 0


def test_incomplete_store_and_resume(tmp_path):
    s = _create(tmp_path / "st", ["a", "b"])
    s.put("a", np.zeros((1, 4)), [1.0])
    with pytest.raises(DataError, match="incomplete"):
        ProposalStore.open(tmp_path / "st")
    with pytest.raises(DataError, match="1 images have no proposals"):
        s.finalize()
    again = _create(tmp_path / "st", ["a", "b"])  # same identity: resume
    assert again.done("a") and not again.done("b") and again.missing() == ["b"]
    with pytest.raises(DataError, match="different params"):
        ProposalStore.create(tmp_path / "st", method="m", params={"a": 2}, dataset="ds", split="s",
                             image_ids=["a", "b"])


def test_bad_values_rejected(tmp_path):
    s = _create(tmp_path / "st", ["a"])
    with pytest.raises(DataError, match="image a: .*NaN"):
        s.put("a", np.array([[0, 0, np.nan, 1]]), [1.0])
    with pytest.raises(DataError, match="not part of this store"):
        s.put("zz", np.zeros((1, 4)), [1.0])
    s.put("a", np.zeros((1, 4)), [1.0])
    s.finalize()
    r = ProposalStore.open(tmp_path / "st")
    with pytest.raises(DataError, match="split 's'"):
        r.check("ds", "other")
    r.check("ds", "s")


def test_shards_merged_equal_single_store(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"{i:03d}" for i in range(7)]
    data = {i: _props(rng, int(rng.integers(0, 9))) for i in ids}
    single = _create(tmp_path / "single", ids, has_masks=True)
    for i in ids:
        single.put(i, *data[i][:3])
    single.finalize()
    shards = []
    for k in range(3):
        sub = ids[k::3]
        sh = _create(tmp_path / f"shard{k}", sub, has_masks=True)
        for i in sub:
            sh.put(i, *data[i][:3])
        sh.finalize()
        shards.append(tmp_path / f"shard{k}")
    merged = merge_stores(shards, tmp_path / "merged", image_ids=ids)
    assert merged.image_ids == single.image_ids
    for i in ids:
        a, b = single.get(i), merged.get(i)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.masks == b.masks
        assert (single.path / "images" / f"{i}.npz").read_bytes() == (merged.path / "images" / f"{i}.npz").read_bytes()
