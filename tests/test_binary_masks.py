"""Binary-mask datasets (a folder of images + a folder of same-named PNG masks, e.g. DUTS-TR) as DeepMask data."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from core.binary_masks import BinaryMaskDataset, mask_objects
from core.config import DM_TRAIN, MaskSource, load_config, values_for
from core.errors import ConfigError, DataError
from proposals.deepmask.sampler import PatchSampler, SamplerParams, load_records

W, H = 120, 100


def _write(tmp_path, masks: dict, sizes: dict | None = None):
    """Images a.jpg, b.jpg, ... and masks (uint8 arrays; None: no mask file; bytes: a corrupt file)."""
    im, mk = tmp_path / "im", tmp_path / "mk"
    im.mkdir(exist_ok=True)
    mk.mkdir(exist_ok=True)
    for name, m in masks.items():
        w, h = (sizes or {}).get(name, (W, H))
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(im / f"{name}.jpg")
        if isinstance(m, bytes):
            (mk / f"{name}.png").write_bytes(m)
        elif m is not None:
            Image.fromarray(m).save(mk / f"{name}.png")
    return im, mk


def _two_blobs():
    """A 40x30 blob at (10, 20), a 20x20 blob at (70, 50) with grey 200, a 3x3 speck, and grey 127 (background)."""
    m = np.zeros((H, W), np.uint8)
    m[20:50, 10:50] = 255
    m[50:70, 70:90] = 200
    m[5:8, 100:103] = 255  # 9 px < 1% of 12000
    m[80:95, 10:30] = 127  # below the 128 threshold
    return m


def test_components_are_objects_largest_first_with_boxes_and_masks(tmp_path):
    im, mk = _write(tmp_path, {"a": _two_blobs()})
    ds = BinaryMaskDataset(im, mk)
    (r,) = ds.records
    assert (r.image_id, r.width, r.height) == ("a", W, H)
    np.testing.assert_array_equal(r.boxes, [[10, 20, 50, 50], [70, 50, 90, 70]])
    np.testing.assert_array_equal(r.labels, [0, 0])
    m = r.masks()
    assert m.shape == (2, H, W) and m[0].sum() == 40 * 30 and m[1].sum() == 20 * 20
    assert not r.iscrowd.any() and ds.classes == ("object",)


def test_whole_mask_is_one_object_and_min_area_drops_fragments(tmp_path):
    im, mk = _write(tmp_path, {"a": _two_blobs()})
    (r,) = BinaryMaskDataset(im, mk, objects="whole").records
    np.testing.assert_array_equal(r.boxes, [[10, 5, 103, 70]])  # the speck is part of the whole foreground
    assert r.masks()[0].sum() == 1200 + 400 + 9
    (r0,) = BinaryMaskDataset(im, mk, min_area=0.0).records
    assert len(r0.boxes) == 3  # the speck counts when no minimum is set
    (r2,) = BinaryMaskDataset(im, mk, min_area=0.05).records  # 600 px: only the 1200-px blob
    np.testing.assert_array_equal(r2.boxes, [[10, 20, 50, 50]])


def test_mask_objects_8_connected():
    fg = np.zeros((10, 10), bool)
    fg[2, 2] = fg[3, 3] = True  # diagonal neighbours: one object
    assert len(mask_objects(fg, "components", 0.0)) == 1


def test_bad_files_are_skipped_and_named(tmp_path, caplog):
    good = _two_blobs()
    im, mk = _write(tmp_path, {"a": good, "b": None, "c": b"not a png", "d": good},
                    sizes={"d": (60, 50)})
    with caplog.at_level(logging.WARNING):
        ds = BinaryMaskDataset(im, mk)
    assert [r.image_id for r in ds.records] == ["a"]
    text = caplog.text
    assert "b.png: no mask for image b.jpg" in text
    assert "c.png: unreadable mask" in text
    assert "d.png: mask is 120x100, its image d.jpg is 60x50" in text
    assert "skipped 3 of 4 images" in text


def test_nothing_usable_is_a_clear_error(tmp_path):
    im, mk = _write(tmp_path, {"a": None})
    with pytest.raises(DataError, match="no usable image/mask pair among 1 images"):
        BinaryMaskDataset(im, mk)
    with pytest.raises(DataError, match="nope: mask folder not found"):
        BinaryMaskDataset(im, tmp_path / "nope")


def test_max_images_keeps_the_first_by_name(tmp_path):
    im, mk = _write(tmp_path, {"c": _two_blobs(), "a": _two_blobs(), "b": _two_blobs()})
    assert [r.image_id for r in BinaryMaskDataset(im, mk, max_images=2).records] == ["a", "b"]


def test_config_source_feeds_the_sampler(tmp_path):
    im, mk = _write(tmp_path, {"a": _two_blobs(), "b": _two_blobs()})
    cfg = load_config(None, [f"deepmask.train_sets=[{{images: {im}, masks: {mk}, objects: components}}]"])
    recs = load_records(cfg.deepmask.train_sets)
    assert len(recs) == 2
    p = SamplerParams(patch_size=64, object_size=32, pos_shift=4, pos_scale=0.25, neg_shift=8, neg_scale=1.0,
                      neg_scale_min=-2.0, neg_scale_max=1.5, batch_size=4, pad_rgb=(128.0, 128.0, 128.0),
                      min_area=50.0)
    s = PatchSampler(recs, p, seed=0)
    assert len(s) == 4  # two blobs per image
    b = s.batch(0, "mask")
    assert b["masks"].shape == (4, 64, 64) and bool((b["masks"].flatten(1).sum(1) > 0).all())


def test_source_errors(tmp_path):
    im, mk = _write(tmp_path, {"a": _two_blobs()})
    with pytest.raises(ConfigError, match="either 'ann'"):
        load_records([MaskSource(images=str(im))])
    with pytest.raises(ConfigError, match="objects must be one of"):
        load_records([MaskSource(images=str(im), masks=str(mk), objects="blobs")])
    with pytest.raises(ConfigError, match="cannot be filtered by category"):
        load_records([MaskSource(images=str(im), masks=str(mk))], categories=["person"])


def test_new_source_fields_at_default_keep_older_stage_keys():
    """A COCO source written before the binary-mask fields existed keys DeepMask's training as it did."""
    cfg = load_config(None, ["deepmask.train_sets=[{ann: a.json, images: im}]"])
    assert values_for(cfg, DM_TRAIN)["deepmask.train_sets"] == [{"ann": "a.json", "images": "im"}]
    cfg2 = load_config(None, ["deepmask.train_sets=[{ann: a.json, images: im, max_images: 5}]"])
    assert values_for(cfg2, DM_TRAIN)["deepmask.train_sets"] == [{"ann": "a.json", "images": "im", "max_images": 5}]


def test_sources_keep_their_own_categories(tmp_path):
    """A COCO set's first category and a mask set's 'object' are different categories for the sampler."""
    from tests.test_deepmask_sampler import make_coco

    (tmp_path / "coco_set").mkdir()
    coco = make_coco(tmp_path / "coco_set", n_images=2)
    im, mk = _write(tmp_path, {"a": _two_blobs()})
    recs = load_records([coco, MaskSource(images=str(im), masks=str(mk))])
    assert sorted({int(v) for r in recs[:2] for v in r.labels}) == [0]
    assert sorted({int(v) for v in recs[2].labels}) == [1]
    p = SamplerParams(patch_size=64, object_size=32, batch_size=4, min_area=50.0)
    assert len(PatchSampler(recs, p)._by_category) == 2
