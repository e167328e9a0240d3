"""DeepMask full-scene inference (paper §3.3): convolutional pass vs patch model, geometry, ranking, masks, boxes."""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch

from core.boxes import box_iou, decode_rles, masks_to_boxes
from core.config import Config, DeepMaskConfig, to_dict
from core.errors import CheckpointError, ConfigError, ImageError
from core.io import atomic_torch_save
from proposals.deepmask.infer import (DeepMaskProposer, build_deepmask_proposer, inference_scales, paste_mask,
                                      paste_masks)
from proposals.deepmask.model import build_deepmask, upsample_masks

torch.set_num_threads(1)

TINY = dict(trunk="small", patch_size=64, object_size=32, mask_size=8, seg_channels=8, lowrank_dim=8,
            score_hidden=[8, 8], object_range=[32.0, 64.0], scale_step=0.5, top_n=20, chunk=7,
            infer_dtype="float32")  # exact comparisons; bfloat16 has its own test


def _dm(**kw):
    return DeepMaskConfig(**{**TINY, **kw})


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_deepmask(_dm(**kw), pretrained=False).eval()


def _image(h=90, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_inference_scales():
    assert inference_scales(DeepMaskConfig()) == pytest.approx([2 ** (e / 2) for e in range(-4, 3)])  # 2^-2..2^1
    zoom = inference_scales(DeepMaskConfig(zoom=True))
    assert len(zoom) == 8 and zoom[-1] == pytest.approx(2 ** 1.5)


def test_dense_pass_equals_patch_model_at_matching_location():
    """The proposer's score map at (u, v) equals the patch model's score on the features of the patch whose corner
    is at (16v, 16u) of the padded scaled image, and the mask it pastes is that patch's upsampled mask."""
    model = _model()
    prop = DeepMaskProposer(model, _dm(object_range=[32.0, 32.0], mask_threshold=0.5), "cpu")
    img = _image()
    (ex, ey, smap, seg), = prop._score_all(img)
    scaled, _, _, (hc, wc) = prop._canvas(img, 1.0)
    with torch.no_grad():
        feat = model.features(model.normalize(prop._tensor(scaled, hc, wc)[None]))
        f = model.feat_size
        finite = torch.isfinite(smap)
        assert finite.sum() > 0
        for u, v in zip(*np.nonzero(finite.numpy())):
            win = feat[:, :, u:u + f, v:v + f]
            assert abs(float(model.score_head(win)[0]) - float(smap[u, v])) < 1e-4
        # the top candidate's pasted mask == the patch model's upsampled mask, cropped to the image
        u, v = np.unravel_index(int(torch.argmax(smap)), smap.shape)
        mk = model.mask_head(feat[:, :, u:u + f, v:v + f])
        up = upsample_masks(mk, model.patch_size)[0].numpy() > 0  # threshold 0.5 <=> logit 0
    ox, oy = 16 * v - prop.pad, 16 * u - prop.pad
    expected = np.zeros(img.shape[:2], bool)
    ys, xs = np.mgrid[0:64, 0:64]
    inside = (ys + oy >= 0) & (ys + oy < img.shape[0]) & (xs + ox >= 0) & (xs + ox < img.shape[1])
    expected[ys[inside] + oy, xs[inside] + ox] = up[inside]
    r = paste_mask(mk[0].numpy(), ox, oy, 64.0, 64.0, img.shape[0], img.shape[1], 0.0)
    got = np.zeros(img.shape[:2], bool)
    if r is not None:
        reg, x0, y0 = r
        got[y0:y0 + reg.shape[0], x0:x0 + reg.shape[1]] = reg
    # cv2's bilinear weights are fixed-point: allow a handful of pixels exactly at the threshold to differ
    assert (got != expected).sum() <= 3


def test_candidate_geometry_with_all_positive_masks():
    """With a threshold that makes every mask pixel positive, each proposal is its patch footprint clipped to the
    image: this pins the position / scale bookkeeping (the official code's off-by-one pitfall)."""
    model = _model()
    prop = DeepMaskProposer(model, _dm(object_range=[64.0, 64.0], mask_threshold=1e-6, top_n=1000), "cpu")
    img = _image(70, 100)
    boxes, scores, rles = prop(img)
    (ex, ey, smap, _), = prop._score_all(img)
    valid = torch.isfinite(smap).numpy()
    expected = []
    for u, v in zip(*np.nonzero(valid)):
        ox, oy = (16 * v - prop.pad) / ex, (16 * u - prop.pad) / ey
        lx, ly = 64 / ex, 64 / ey
        expected.append([max(0, math.ceil(ox - .5)), max(0, math.ceil(oy - .5)), min(100, math.ceil(ox + lx - .5)),
                         min(70, math.ceil(oy + ly - .5))])
    assert len(boxes) == valid.sum()
    assert {tuple(b) for b in boxes.astype(int).tolist()} == {tuple(b) for b in expected}
    # patch centres cover the image: the first / last centres are within half a stride (scaled) of the borders
    assert boxes[:, 0].min() == 0 and boxes[:, 2].max() == 100


def test_boxes_are_mask_extents_and_ranked_top_n():
    model = _model(1)
    dm = _dm(mask_threshold=1e-6, top_n=15)  # no empty mask: ranking is exactly the top 15 scores
    prop = DeepMaskProposer(model, dm, "cpu")
    img = _image()
    boxes, scores, rles = prop(img)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert len(boxes) == len(scores) == len(rles) == 15
    masks = decode_rles(rles)
    assert masks.shape == (15,) + img.shape[:2]
    np.testing.assert_array_equal(masks_to_boxes(masks), boxes)
    assert np.all(np.diff(scores) <= 0)
    all_scores = torch.cat([s.flatten() for _, _, s, _ in prop._score_all(img)])
    top = torch.sigmoid(torch.sort(all_scores[torch.isfinite(all_scores)], descending=True).values[:15]).numpy()
    np.testing.assert_allclose(scores, top, rtol=1e-5)
    # default threshold: still mask extents, ranked, at most top_n
    b2, s2, r2 = DeepMaskProposer(model, dataclasses.replace(dm, mask_threshold=0.5), "cpu")(img)
    assert len(b2) <= 15 and np.all(np.diff(s2) <= 0)
    if len(b2):
        np.testing.assert_array_equal(masks_to_boxes(decode_rles(r2)), b2)


def test_empty_masks_are_dropped():
    model = _model()
    with torch.no_grad():
        model.seg_out.weight.zero_()
        model.seg_out.bias.fill_(-50.0)  # every mask empty
    boxes, scores, rles = DeepMaskProposer(model, _dm(), "cpu")(_image())
    assert boxes.shape == (0, 4) and scores.shape == (0,) and rles == []
    with torch.no_grad():  # only the left half of every mask is on: nothing dropped, boxes narrower than patches
        b = torch.full((8, 8), -50.0)
        b[:, :4] = 50.0
        model.seg_out.bias.copy_(b.flatten())
    boxes, _, _ = DeepMaskProposer(model, _dm(), "cpu")(_image())
    assert len(boxes) == 20 and np.all(boxes[:, 2] - boxes[:, 0] <= 64 / 0.5 / 2 + 1)


def test_nms_option():
    model = _model(2)
    boxes, scores, _ = DeepMaskProposer(model, _dm(mask_threshold=1e-6, nms=0.5, top_n=50), "cpu")(_image())
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0)
    assert len(boxes) > 1 and iou.max() <= 0.5 + 1e-6 and np.all(np.diff(scores) <= 0)


def test_scale_batch_and_image_cap_keep_original_coordinates():
    model = _model(3)
    img = _image(100, 150)
    b1, s1, _ = DeepMaskProposer(model, _dm(), "cpu")(img)
    b2, s2, r2 = DeepMaskProposer(model, _dm(scale_batch=True), "cpu")(img)
    assert len(b2) == len(b1)  # same candidates; padding of the batch changes only border features
    b3, s3, r3 = DeepMaskProposer(model, _dm(max_image_side=75, mask_threshold=1e-6), "cpu")(img)
    assert r3[0]["size"] == [100, 150]
    assert b3[:, 2].max() <= 150 and b3[:, 3].max() <= 100 and b3[:, 2].max() > 100


def test_build_from_checkpoint_and_errors(tmp_path):
    cfg = Config(deepmask=_dm())
    model = _model()
    path = tmp_path / "dm.pt"
    atomic_torch_save({"model": model.state_dict(), "config": to_dict(cfg), "iteration": 0}, path)
    run_cfg = dataclasses.replace(cfg, deepmask=dataclasses.replace(cfg.deepmask, mask_size=56, top_n=5))
    prop = build_deepmask_proposer(run_cfg, str(path))  # architecture from the checkpoint, top_n from the config
    boxes, scores, rles = prop(_image())
    assert prop.has_masks and len(boxes) <= 5
    with pytest.raises(ImageError):
        prop(np.zeros((10, 10), np.uint8))
    with pytest.raises(CheckpointError):
        build_deepmask_proposer(cfg, str(tmp_path / "missing.pt"))


def test_region_rle_equals_full_image_encode():
    """region_rle and regions_rle give pycocotools' RLE of the full-size mask, including the corner cases of the
    column-major runs: rectangles touching the first / last pixel, spanning whole columns (runs crossing columns),
    empty ones; one region at a time and many at once."""
    from pycocotools import mask as mask_utils

    from proposals.deepmask.infer import region_rle, regions_rle

    rng = np.random.default_rng(0)
    regs, where, wants = [], [], []
    cases = [(0, 0, 7, 5), (3, 0, 4, 9), (0, 2, 7, 7), (6, 8, 1, 1), (2, 3, 3, 4), (0, 0, 1, 1)]
    for _ in range(40):
        x0, y0 = int(rng.integers(0, 7)), int(rng.integers(0, 9))
        cases.append((x0, y0, int(rng.integers(1, 8 - x0)), int(rng.integers(1, 10 - y0))))
    for x0, y0, rw, rh in cases:
        for fill in ("random", "full", "empty"):
            reg = {"random": rng.random((rh, rw)) < 0.5, "full": np.ones((rh, rw), bool),
                   "empty": np.zeros((rh, rw), bool)}[fill]
            full = np.zeros((9, 7), np.uint8, order="F")
            full[y0:y0 + rh, x0:x0 + rw] = reg
            want = mask_utils.encode(full)
            want["counts"] = want["counts"].decode("ascii")
            assert region_rle(reg, x0, y0, 9, 7) == want, (x0, y0, rw, rh, fill)
            regs.append(reg)
            where.append((x0, y0))
            wants.append(want)
    # all of them in one call (what inference does with a chunk), and large counts (several 5-bit groups, negative
    # differences) on a large image
    got = regions_rle(regs, [x for x, _ in where], [y for _, y in where], 9, 7)
    assert got == wants
    big = np.zeros((1000, 1200), np.uint8, order="F")
    big[0, 0] = big[700:, 1100:] = big[:300, 5] = 1
    big[999, 1199] = 0
    want = mask_utils.encode(big)
    want["counts"] = want["counts"].decode("ascii")
    sub = big[:, 5:1200].astype(bool)
    assert regions_rle([sub, big.astype(bool)], [5, 0], [0, 0], 1000, 1200)[1] == want
    assert len(want["counts"]) > 8


def test_paste_window_equals_the_whole_footprint():
    """paste_mask resizes only the window around the logits above the threshold: the mask equals the one of a
    resize of the whole footprint (up to pixels exactly at the threshold)."""
    rng = np.random.default_rng(1)
    h, w = 120, 150
    smaller, cases = 0, []
    for _ in range(30):
        logits = rng.normal(-3, 1, (8, 8)).astype(np.float32)
        r0, c0 = rng.integers(0, 6, 2)
        logits[r0:r0 + 3, c0:c0 + 2] += 6
        ox, oy, lx = float(rng.uniform(-60, 100)), float(rng.uniform(-60, 80)), float(rng.uniform(10, 200))
        full = np.zeros((h, w), bool)
        x0, x1 = max(0, math.ceil(ox - 0.5)), min(w, math.ceil(ox + lx - 0.5))
        y0, y1 = max(0, math.ceil(oy - 0.5)), min(h, math.ceil(oy + lx - 0.5))
        if x1 > x0 and y1 > y0:
            f = 8 / lx
            mat = np.array([[f, 0, f * (x0 + 0.5 - ox) - 0.5], [0, f, f * (y0 + 0.5 - oy) - 0.5]])
            reg = cv2.warpAffine(logits, mat, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_REPLICATE)
            full[y0:y1, x0:x1] = reg > 0
        got = np.zeros((h, w), bool)
        r = paste_mask(logits, ox, oy, lx, lx, h, w, 0.0)
        if r is not None:
            reg, a, b = r
            got[b:b + reg.shape[0], a:a + reg.shape[1]] = reg
            smaller += reg.size < (x1 - x0) * (y1 - y0)
        assert (got != full).sum() <= 2
        cases.append((logits, (ox, oy, lx, lx), full))
    assert smaller >= 10  # the window is the point: most masks are resized on part of their footprint
    # paste_masks: all candidates of a chunk at once, the same masks -- among them ones outside the image and ones
    # with no logit above the threshold (None)
    cases.append((np.full((8, 8), -5.0, np.float32), (10.0, 10.0, 50.0, 50.0), np.zeros((h, w), bool)))
    cases.append((np.full((8, 8), 5.0, np.float32), (-90.0, 10.0, 50.0, 50.0), np.zeros((h, w), bool)))
    out = paste_masks(np.stack([c[0] for c in cases]), np.array([c[1] for c in cases]), h, w, 0.0)
    assert len(out) == len(cases) and out[-1] is None and out[-2] is None
    for (logits, geo, full), r in zip(cases, out):
        single = paste_mask(logits, *geo, h, w, 0.0)
        assert (r is None) == (single is None)
        got = np.zeros((h, w), bool)
        if r is not None:
            reg, a, b = r
            assert (a, b) == single[1:] and np.array_equal(reg, single[0])
            got[b:b + reg.shape[0], a:a + reg.shape[1]] = reg
        assert (got != full).sum() <= 2


@pytest.mark.parametrize("batched", [False, True])
def test_bfloat16_inference_is_close_to_float32(batched):
    """infer_dtype=bfloat16 (AMX / AVX512-BF16 CPUs, GPUs): the same candidates with score logits within bfloat16
    rounding of float32's, valid proposals (boxes are mask extents); an unknown format is a config error."""
    model = _model(4)
    img = _image(100, 130)
    ref = DeepMaskProposer(model, _dm(scale_batch=batched), "cpu")._score_all(img)
    prop = DeepMaskProposer(model, _dm(scale_batch=batched, infer_dtype="bfloat16", mask_threshold=0.4), "cpu")
    got = prop._score_all(img)
    for (_, _, s32, _), (_, _, s16, _) in zip(ref, got):
        fin = torch.isfinite(s32)
        assert torch.equal(fin, torch.isfinite(s16)) and fin.any()
        assert float((s32[fin] - s16[fin]).abs().max()) < 0.05 * max(1.0, float(s32[fin].abs().max()))
    boxes, scores, rles = prop(img)
    assert len(boxes) and np.all(np.diff(scores) <= 0)
    np.testing.assert_array_equal(masks_to_boxes(decode_rles(rles)), boxes)
    with pytest.raises(ConfigError, match="deepmask.infer_dtype"):
        DeepMaskProposer(model, _dm(infer_dtype="int8"), "cpu")


def test_inference_scales_cover_the_object_range_whatever_the_object_size():
    """Scales are derived from object_range (image px) and object_size: the paper's 64..512 px at object_size 128
    are exactly 2^-2 .. 2^1; a 92-px object size keeps covering 64..512 (more, never less), one step apart."""
    import math

    from core.config import DeepMaskConfig
    from proposals.deepmask.infer import covered_object_range, scale_exponents

    assert scale_exponents(128, [64, 512], 0.5) == [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0]
    for obj in (128, 92, 64, 40):
        for rng_px in ([64, 512], [46, 520], [22.63, 256]):
            dm = DeepMaskConfig(object_size=obj, object_range=list(rng_px))
            lo, hi = covered_object_range(dm)
            assert lo <= rng_px[0] * 1.01 and hi >= rng_px[1] * 0.99
            assert lo > rng_px[0] / 2 ** 0.5  # not more than one step beyond
            exps = [math.log2(s) for s in inference_scales(dm)]
            assert all(abs(b - a - 0.5) < 1e-9 for a, b in zip(exps, exps[1:]))
    zoom = inference_scales(DeepMaskConfig(zoom=True))
    assert len(zoom) == 8 and math.log2(max(zoom)) == pytest.approx(1.5)  # DeepMaskZoom: one larger scale
