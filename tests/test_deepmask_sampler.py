"""DeepMask patch sampler (paper §3.2, §3.4) on a tiny hand-made COCO set with RLE masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from core.config import MaskSource
from core.errors import DataError
from proposals.deepmask.sampler import (PatchSampler, PatchStream, SamplerParams, load_records, split_holdout,
                                        warp_patch)

OBJ_COLOUR = (250, 20, 20)
BG_COLOUR = (20, 120, 20)


def make_coco(tmp_path, n_images=3, size=(200, 160)):
    """Images (w x h) with an L-shaped object (asymmetric: catches flip mistakes), a 40x24 rectangle, a tiny 6x6
    square (too small to be a positive) and a crowd region; COCO json with RLE masks."""
    w, h = size
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images, anns = [], []
    aid = 1
    for i in range(n_images):
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = BG_COLOUR
        objs = []
        L = np.zeros((h, w), np.uint8)  # L shape: 60 tall x 40 wide bbox, at x 20+10i, y 30
        x0, y0 = 20 + 10 * i, 30
        L[y0:y0 + 60, x0:x0 + 12] = 1
        L[y0 + 48:y0 + 60, x0:x0 + 40] = 1
        objs.append((L, 0))
        R = np.zeros((h, w), np.uint8)
        R[100:124, 120:160] = 1
        objs.append((R, 0))
        T = np.zeros((h, w), np.uint8)
        T[10:16, 150:156] = 1
        objs.append((T, 0))
        C = np.zeros((h, w), np.uint8)
        C[130:150, 20:60] = 1
        objs.append((C, 1))
        for m, crowd in objs:
            img[m.astype(bool)] = OBJ_COLOUR
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append({"id": aid, "image_id": i + 1, "category_id": 1, "segmentation": rle, "area": float(m.sum()),
                         "bbox": [x, y, bw, bh], "iscrowd": crowd})
            aid += 1
        Image.fromarray(img).save(img_dir / f"{i + 1}.png")
        images.append({"id": i + 1, "file_name": f"{i + 1}.png", "width": w, "height": h})
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return MaskSource(ann=str(ann), images=str(img_dir))


@pytest.fixture
def records(tmp_path):
    return load_records([make_coco(tmp_path)])


def _params(**kw):
    base = dict(patch_size=112, object_size=64, pos_shift=8, pos_scale=0.25, neg_shift=16, neg_scale=1.0,
                neg_scale_min=-2.0, neg_scale_max=1.5, batch_size=8, pad_rgb=(128.0, 128.0, 128.0))
    base.update(kw)
    return SamplerParams(**base)


def _box(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_positive_filter_skips_crowd_and_tiny(records):
    s = PatchSampler(records, _params())
    assert len(s) == 2 * len(records)  # the L and the rectangle of every image; tiny square and crowd skipped
    assert set(s.positives[:, 1].tolist()) == {0, 1}


@pytest.mark.parametrize("patch,obj", [(112, 64), (224, 128)])
def test_canonical_positive_is_centred_with_max_side_object_size(records, patch, obj):
    s = PatchSampler(records, _params(patch_size=patch, object_size=obj, pos_shift=0, pos_scale=0, flip=False))
    b = s.batch(0, kind="mask")
    for k in range(len(b["labels"])):
        m = b["masks"][k].numpy()
        x1, y1, x2, y2 = _box(m)
        assert abs((x1 + x2) / 2 - patch / 2) <= 1 and abs((y1 + y2) / 2 - patch / 2) <= 1
        assert abs(max(x2 - x1, y2 - y1) - obj) <= 1.5


@pytest.mark.parametrize("patch,obj,shift", [(112, 64, 8), (224, 128, 16)])
def test_jittered_positive_within_tolerances(records, patch, obj, shift):
    # §3.4: +-16 px shift and 2^(+-1/4) scale for the paper's 224 / 128 (and scaled-down values for 112 / 64)
    p = _params(patch_size=patch, object_size=obj, pos_shift=shift)
    s = PatchSampler(records, p)
    for t in range(0, 12, 2):
        b = s.batch(t)
        assert b["kind"] == "mask" and bool((b["labels"] == 1).all())
        for k in range(len(b["labels"])):
            x1, y1, x2, y2 = _box(b["masks"][k].numpy())
            assert abs((x1 + x2) / 2 - patch / 2) <= p.pos_shift + 1
            assert abs((y1 + y2) / 2 - patch / 2) <= p.pos_shift + 1
            side = max(x2 - x1, y2 - y1)
            assert obj * 2 ** -p.pos_scale - 1.5 <= side <= obj * 2 ** p.pos_scale + 1.5


def test_patch_and_mask_share_the_transform_including_flip(records):
    s = PatchSampler(records, _params())
    flips = set()
    for t in range(0, 10, 2):
        b = s.batch(t)
        for k in range(len(b["labels"])):
            img, m = b["images"][k].numpy().astype(int), b["masks"][k].numpy()
            flips.add(bool(b["params"][k, 4]))
            # away from the mask edges, masked pixels have the object's colour and the others do not (objects of
            # this image never touch, and the positive's mask holds only the centred object)
            import scipy.ndimage as ndi

            inner = ndi.binary_erosion(m, iterations=2)
            red = (np.abs(img - OBJ_COLOUR).sum(-1) < 60)
            assert inner.sum() > 0 and red[inner].mean() > 0.98
    assert flips == {True, False}


def test_flip_mirrors_the_L(records):
    s = PatchSampler(records, _params(pos_shift=0, pos_scale=0, flip=False))
    rng = np.random.default_rng(0)
    cx, cy, sc, _ = s.positive_params(rng, 0, 0)
    m = s._mask(0, 0)
    a = warp_patch(m, cx, cy, sc, False, 112, 0.0) >= 128
    b = warp_patch(m, cx, cy, sc, True, 112, 0.0) >= 128
    assert np.array_equal(a[:, ::-1], b) or np.abs(a[:, ::-1].astype(int) - b).sum() <= 112  # 1-px rounding
    # the L's vertical bar is on the left before the flip, on the right after it
    assert a[:60, :56].sum() > 4 * a[:60, 56:].sum() and b[:60, 56:].sum() > 4 * b[:60, :56].sum()


def test_negatives_obey_the_distance_rule(records):
    p = _params(batch_size=16)
    s = PatchSampler(records, p)
    n = 0
    for t in range(1, 30, 2):
        b = s.batch(t)
        assert b["kind"] == "score"
        assert int((b["labels"] == 1).sum()) == int((b["labels"] == -1).sum()) == 8  # 1:1 (§3.2)
        for k in np.flatnonzero(b["labels"].numpy() < 0):
            ri, cx, cy, sc, _ = b["params"][k].tolist()
            r = records[int(ri)]
            for box in r.boxes:  # every object, crowd and tiny ones included
                c = (box[:2] + box[2:]) / 2
                s_obj = p.object_size / max(box[2] - box[0], box[3] - box[1])
                shift = max(abs(cx - c[0]), abs(cy - c[1])) * sc
                assert shift >= p.neg_shift or abs(np.log2(sc / s_obj)) >= p.neg_scale
            assert not b["masks"][k].any()
            n += 1
    assert n == 15 * 8


def test_is_negative_rule_examples(records):
    s = PatchSampler(records, _params())
    r = records[0]
    j = 1  # the 40x24 rectangle, centre (140, 112), canonical scale 64/40 = 1.6
    cx, cy = (r.boxes[j, :2] + r.boxes[j, 2:]) / 2
    assert not s.is_negative(0, cx, cy, 1.6)  # the canonical positive itself
    assert not s.is_negative(0, cx + 15 / 1.6, cy, 1.6)  # 15 px away in the patch
    assert s.is_negative(0, cx + 17 / 1.6, cy, 1.6)  # 17 px away
    assert s.is_negative(0, cx, cy, 1.6 * 2.01)  # one octave off in scale
    assert not s.is_negative(0, cx, cy, 1.6 * 1.9)


def test_batches_are_deterministic_and_worker_independent(records):
    s = PatchSampler(records, _params(), seed=3)
    a, b = s.batch(5), PatchSampler(records, _params(), seed=3).batch(5)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(s.batch(6)["images"], a["images"])
    loader = torch.utils.data.DataLoader(PatchStream(s, start=4), batch_size=None, num_workers=2)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 4:
            break
    assert [g["index"] for g in got] == [4, 5, 6, 7]
    assert torch.equal(got[1]["images"], a["images"])


def test_joint_mode_batches_are_balanced(records):
    s = PatchSampler(records, _params(batch_mode="joint", batch_size=6))
    b = s.batch(0)
    assert b["kind"] == "joint" and int((b["labels"] > 0).sum()) == 3


def test_patch_outside_the_image_is_padded():
    img = np.full((20, 30, 3), 200, np.uint8)
    p = warp_patch(img, 15, 10, 1.0, False, 64, (10.0, 20.0, 30.0))
    assert tuple(p[0, 0]) == (10, 20, 30) and tuple(p[32, 32]) == (200, 200, 200)
    # downscaled patch (area pre-reduction path), and a patch entirely outside the image
    q = warp_patch(img, 15, 10, 0.25, False, 64, (10.0, 20.0, 30.0))
    assert tuple(q[32, 32]) == (200, 200, 200) and tuple(q[0, 0]) == (10, 20, 30)
    r = warp_patch(img, 1000, 1000, 0.25, False, 64, (10.0, 20.0, 30.0))
    assert (r == np.array([10, 20, 30], np.uint8)).all()


def test_mask_geometry_is_exact_for_integer_scales():
    m = np.zeros((40, 40), np.float32)
    m[10:20, 10:30] = 1  # 20x10 box centred at (20, 15)
    out = warp_patch(m, 20.0, 15.0, 2.0, False, 64, 0.0) > 0.5
    assert _box(out) == (12, 22, 52, 42)  # 40x20 centred at (32, 32)


def test_no_positive_is_a_data_error(tmp_path, records):
    for r in records:
        r.iscrowd[:] = True
    with pytest.raises(DataError, match="positive"):
        PatchSampler(records, _params())


def test_split_holdout_is_deterministic(records):
    a, b = split_holdout(records, 0.34, 0)
    a2, b2 = split_holdout(records, 0.34, 0)
    assert [r.image_id for r in b] == [r.image_id for r in b2] and len(b) == 1 and len(a) == 2


# ------------------------------------------------------------------ which object a positive is (official sampler)
def _records_two_classes():
    """Image 0: one object of class 0; images 1-3: three objects of class 1 each (9 in all)."""
    from core.datasets import Record

    def rec(i, labels):
        n = len(labels)
        boxes = np.array([[10 + 30 * k, 10, 30 + 30 * k, 40] for k in range(n)], np.float32)
        return Record(str(i), f"{i}.png", 200, 100, boxes, np.array(labels, np.int64), np.zeros(n, bool),
                      segmentations=[[[0, 0, 1, 0, 1, 1]]] * n)

    return [rec(0, [0]), rec(1, [1, 1, 1]), rec(2, [1, 1, 1]), rec(3, [1, 1, 1])]


@pytest.mark.parametrize("mode, kind, share_of_class0", [
    ("object", "mask", 1 / 10),  # uniform over the 10 objects
    ("category", "mask", 1 / 2),  # a category uniformly, then one of its instances
    ("category", "score", 1 / 2),
    ("official", "mask", 1 / 2),  # official mask batches: category then instance
    ("official", "score", 1 / 4),  # official score batches: an image uniformly (4 images), then one of its objects
])
def test_positive_sampling_frequencies(mode, kind, share_of_class0):
    s = PatchSampler(_records_two_classes(), _params(positive_sampling=mode), seed=0)
    rng = np.random.default_rng(0)
    draws = [s.draw_positive(rng, kind) for _ in range(8000)]
    share = np.mean([ri == 0 for ri, _ in draws])
    assert abs(share - share_of_class0) < 0.02, share
    # within class 1, every instance equally often
    counts = np.bincount([3 * (ri - 1) + j for ri, j in draws if ri > 0], minlength=9)
    assert counts.min() > 0.8 * counts.mean()


def test_negative_scales_follow_the_object_range_in_image_pixels():
    """The scales negatives are drawn at come from neg_object_range (image px) and object_size: a smaller patch /
    object size keeps the object sizes, not the scale exponents."""
    import math

    from core.config import DeepMaskConfig

    for obj, patch in ((128, 224), (92, 160), (64, 128)):
        dm = DeepMaskConfig(object_size=obj, patch_size=patch)
        p = SamplerParams.from_config(dm, (0.0, 0.0, 0.0))
        assert obj / 2 ** p.neg_scale_max == pytest.approx(dm.neg_object_range[0], rel=1e-6)
        assert obj / 2 ** p.neg_scale_min == pytest.approx(dm.neg_object_range[1], rel=1e-6)
    p = SamplerParams.from_config(DeepMaskConfig(), (0.0, 0.0, 0.0))  # the paper's: 2^-2.5 .. 2^1.5 at 128
    assert (p.neg_scale_min, p.neg_scale_max) == (pytest.approx(-2.5, abs=1e-6), pytest.approx(1.5, abs=1e-6))
    assert math.isclose(p.neg_scale_max - p.neg_scale_min, 4.0, abs_tol=1e-6)


@pytest.mark.parametrize("mode", ["object", "official"])
def test_source_shares_set_the_mix_of_positives_and_negative_images(mode):
    # source 0: image 0 (one object); source 1: images 1-3 (nine objects). share 0.5 for source 0: half of the
    # positives and half of the negatives' images come from it, whatever its size; within a source as before
    recs = _records_two_classes()
    for r in recs:
        r.source = 0 if r.image_id == "0" else 1
    s = PatchSampler(recs, _params(positive_sampling=mode), seed=0, shares=[0.5, 0.0])
    rng = np.random.default_rng(0)
    draws = [s.draw_positive(rng, "mask") for _ in range(8000)]
    assert abs(np.mean([ri == 0 for ri, _ in draws]) - 0.5) < 0.02
    counts = np.bincount([3 * (ri - 1) + j for ri, j in draws if ri > 0], minlength=9)
    assert counts.min() > 0.8 * counts.mean()  # within source 1, every instance equally often
    neg = [s._shared.image(rng) for _ in range(4000)]
    assert abs(np.mean(np.array(neg) == 0) - 0.5) < 0.03
    # no share: uniform over the objects (1 of 10) and over the images (1 of 4); the draws are today's
    plain, none = PatchSampler(recs, _params(positive_sampling="object"), seed=0), \
        PatchSampler(recs, _params(positive_sampling="object"), seed=0, shares=[0.0, 0.0])
    a = [plain.draw_positive(np.random.default_rng(1), "mask") for _ in range(50)]
    b = [none.draw_positive(np.random.default_rng(1), "mask") for _ in range(50)]
    assert a == b and none._shared is None
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="share"):
        PatchSampler(recs, _params(), seed=0, shares=[0.7, 0.6])


def test_share_keys_training_only_when_set(tmp_path):
    from core.config import DM_TRAIN, load_config, values_for

    cfg = load_config("configs/voc07_real_cpu.yaml")
    keyed = values_for(cfg, DM_TRAIN)["deepmask.train_sets"]
    assert all("share" not in s for s in keyed)  # the real run's DeepMask keeps its key
    cfg = load_config("configs/voc07_real_cpu.yaml", [
        "deepmask.train_sets=[{ann: a.json, images: im, share: 0.5}, {images: i2, masks: m2}]"])
    keyed = values_for(cfg, DM_TRAIN)["deepmask.train_sets"]
    assert keyed[0]["share"] == 0.5 and "share" not in keyed[1]
    # the records carry their set's index; each set's categories stay its own
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recs = load_records([make_coco(tmp_path / "a", n_images=2), make_coco(tmp_path / "b", n_images=3)])
    assert [r.source for r in recs] == [0, 0, 1, 1, 1]
    assert {int(v) for r in recs[:2] for v in r.labels} == {0} and {int(v) for r in recs[2:] for v in r.labels} == {1}
