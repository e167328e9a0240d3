"""Fast R-CNN pieces: RoI sampling, target coding, flips, NMS post-processing, model shapes, truncated SVD."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from core.config import load_config
from detector.model import build_detector, truncated_svd_linear
from core.boxes import clip_boxes
from detector.sampling import BBOX_STDS, BoxCoder, sample_rois
from detector.test import postprocess
from detector.train import detection_loss, prepare_sample
from detector.transforms import compute_scale, flip_boxes

torch.set_num_threads(1)


def _random_boxes(n, size=200, gen=None, min_side=2.0):
    gen = gen or torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + min_side
    return torch.cat([xy, xy + wh], 1)


def _proposals_around(gt, n=2000, seed=0):
    """Many boxes at every IoU level around the gt boxes, plus random ones."""
    g = torch.Generator().manual_seed(seed)
    base = gt[torch.randint(len(gt), (n,), generator=g)]
    w = (base[:, 2] - base[:, 0])[:, None]
    h = (base[:, 3] - base[:, 1])[:, None]
    jit = (torch.rand(n, 4, generator=g) - 0.5) * torch.cat([w, h, w, h], 1) * torch.rand(n, 1, generator=g) * 2
    boxes = base + jit
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return torch.cat([boxes, _random_boxes(500, gen=g)])


GT = torch.tensor([[20.0, 30.0, 90.0, 120.0], [100.0, 50.0, 180.0, 110.0], [40.0, 140.0, 70.0, 190.0]])
GT_LABELS = torch.tensor([4, 0, 11])


def test_sampling_fractions_and_iou_bands():
    props = _proposals_around(GT)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        s = sample_rois(props, GT, GT_LABELS, num_rois=64, generator=g)
        assert s.rois.shape == (64, 4)
        assert s.num_fg == 16  # round(0.25 * 64): plenty of fg candidates -> exactly 25%
        iou = box_iou(s.rois, GT).max(1).values
        fg, bg = s.labels > 0, s.labels == 0
        assert fg.sum() == s.num_fg and bool(fg[:16].all()) and bool(bg[16:].all())
        assert bool((iou[fg] >= 0.5).all())
        assert bool((iou[bg] >= 0.1).all()) and bool((iou[bg] < 0.5).all())
        # fg labels are the class (1-based) of the best-overlapping gt
        best = box_iou(s.rois[fg], GT).argmax(1)
        assert torch.equal(s.labels[fg], GT_LABELS[best] + 1)
        assert torch.allclose(s.max_iou, iou)


def test_sampling_never_below_lo_and_small_pools():
    # proposals all far from the object: IoU 0 -> never sampled; only the gt box itself is fg
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    far = torch.tensor([[100.0, 100.0, 150.0, 150.0]] * 50)
    s = sample_rois(far, gt, torch.tensor([2]), num_rois=64)
    assert s.num_fg == 1 and len(s.rois) == 1 and torch.equal(s.rois[0], gt[0])
    # few fg candidates: all taken, the rest background; fewer than num_rois if bg runs out (official behaviour)
    near = torch.tensor([[0.0, 0.0, 20.0, 18.0], [0.0, 0.0, 20.0, 8.0], [0.0, 0.0, 20.0, 1.0]])  # IoU .9, .4, .05
    s = sample_rois(near, gt, torch.tensor([2]), num_rois=64)
    assert s.num_fg == 2 and len(s.rois) == 3
    assert s.labels.tolist() == [3, 3, 0]
    # no gt at all -> nothing to sample
    s = sample_rois(far, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), num_rois=64)
    assert len(s.rois) == 0 and s.num_fg == 0
    # fg capped at 25% even when everything is foreground
    same = gt.repeat(100, 1)
    s = sample_rois(same, gt, torch.tensor([0]), num_rois=64)
    assert s.num_fg == 16 and len(s.rois) == 16


def test_sampling_deterministic_with_generator():
    props = _proposals_around(GT)
    a = sample_rois(props, GT, GT_LABELS, generator=torch.Generator().manual_seed(5))
    b = sample_rois(props, GT, GT_LABELS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.rois, b.rois) and torch.equal(a.labels, b.labels)


def test_encode_decode_inverse_and_stds():
    g = torch.Generator().manual_seed(3)
    rois, gt = _random_boxes(300, gen=g), _random_boxes(300, gen=g)
    coder = BoxCoder()
    t = coder.encode(rois, gt)
    assert torch.allclose(coder.decode(rois, t), gt, atol=1e-3)
    # class-specific layout (R,K,4) decodes each class
    t3 = torch.stack([t, torch.zeros_like(t)], 1)
    out = coder.decode(rois, t3)
    assert torch.allclose(out[:, 0], gt, atol=1e-3) and torch.allclose(out[:, 1], rois, atol=1e-4)
    # fixed stds (0.1,0.1,0.2,0.2) == torchvision BoxCoder weights (10,10,5,5)
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

    tv = TorchvisionBoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode_single(gt, rois)
    assert BBOX_STDS == coder.stds == (0.1, 0.1, 0.2, 0.2)
    assert torch.allclose(t, tv, atol=1e-4)
    # a shifted box: dx = 0.1 * width shift / std 0.1 = 1
    r = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert torch.allclose(coder.encode(r, r + torch.tensor([1.0, 0, 1.0, 0])), torch.tensor([[1.0, 0, 0, 0]]))
    # another model's stds: twice the stds, half the targets
    assert torch.allclose(BoxCoder((0.2, 0.2, 0.4, 0.4)).encode(rois, gt), t / 2, atol=1e-5)
    clipped = clip_boxes(torch.tensor([[-5.0, -1.0, 50.0, 70.0]]), height=60, width=40)
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 60.0]]
    # (R,K,4) tensors and numpy arrays, the same order
    assert clip_boxes(torch.full((2, 3, 4), 99.0), 60, 40)[1, 2].tolist() == [40.0, 60.0, 40.0, 60.0]
    arr = clip_boxes(np.array([[-5.0, -1.0, 50.0, 70.0]]), 60, 40)
    assert arr.dtype == np.float32 and arr.tolist() == [[0.0, 0.0, 40.0, 60.0]]


def test_flip_boxes_exact():
    b = np.array([[0, 5, 10, 20], [30, 0, 40, 8]], np.float32)
    f = flip_boxes(b, 40)
    assert f.tolist() == [[30, 5, 40, 20], [0, 0, 10, 8]]
    assert np.array_equal(flip_boxes(f, 40), b)


def test_flipped_sample_gives_flipped_targets():
    cfg = load_config(None, ["detector.trunk=small", "detector.pretrained="])
    d = cfg.detector
    h, w = 120, 200
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 15.0)], -1).astype(np.uint8)
    gt = GT.numpy()
    props = _proposals_around(GT, 600).numpy()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = prepare_sample(image, gt, GT_LABELS.numpy(), props, False, 100, d, mean, std, torch.Generator().manual_seed(0))
    b = prepare_sample(image, gt, GT_LABELS.numpy(), props, True, 100, d, mean, std, torch.Generator().manual_seed(0))
    # same RoIs (the IoUs are flip-invariant, so the same generator draws the same ones), mirrored
    sc = a["scale"]
    assert a["scale"] == b["scale"] == pytest.approx(100 / 120)
    assert torch.allclose(b["rois"], torch.from_numpy(flip_boxes(a["rois"].numpy() / sc, w)) * sc, atol=1e-3)
    assert torch.equal(a["labels"], b["labels"])
    fg = a["labels"] > 0
    assert fg.any()
    assert torch.allclose(b["targets"][:, 0], -a["targets"][:, 0], atol=1e-5)  # dx mirrored
    assert torch.allclose(b["targets"][:, 1:], a["targets"][:, 1:], atol=1e-5)
    # resampling at a non-integer scale shifts by < 1 px between the two orders: compare smooth images loosely
    assert (b["image"] - a["image"].flip(-1)).abs().mean() < 0.02


def test_compute_scale():
    assert compute_scale(375, 500, 600, 1000) == pytest.approx(1.6)
    assert compute_scale(100, 1000, 600, 1000) == pytest.approx(1.0)  # longer side capped
    assert compute_scale(500, 333, 600, 1000) == pytest.approx(600 / 333)


def test_postprocess_per_class_nms_threshold_cap():
    # two overlapping boxes of class 1 (IoU ~0.8) and the same boxes scored for class 2
    b0 = torch.tensor([10.0, 10.0, 50.0, 50.0])
    b1 = torch.tensor([12.0, 12.0, 52.0, 52.0])
    b2 = torch.tensor([100.0, 100.0, 140.0, 140.0])
    boxes = torch.stack([torch.stack([b0, b0, b0]), torch.stack([b1, b1, b1]), torch.stack([b2, b2, b2])])
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.96, 0.04, 0.0]])
    b, s, lab, props = postprocess(scores, boxes, score_thresh=0.05, nms_thresh=0.3, max_dets=100)
    # class 1: b0 (0.6) suppresses b1 (0.5); class 2: b0 (0.3) suppresses b1 (0.3, later);
    # the third RoI is below the 0.05 threshold for both classes
    assert lab.tolist() == [0, 1] and props.tolist() == [0, 0]  # both regressed from proposal 0
    assert s.tolist() == pytest.approx([0.6, 0.3])
    assert torch.equal(b[0], b0) and torch.equal(b[1], b0)
    # NMS off across classes: same box kept for both classes; nms 1.0 keeps everything over threshold
    d = postprocess(scores, boxes, 0.05, 1.0, 100)
    assert len(d.scores) == 4
    d = postprocess(scores, boxes, 0.05, 1.0, max_dets=3)
    assert d.scores.tolist() == pytest.approx([0.6, 0.5, 0.3]) and d.proposals.tolist() == [0, 1, 0]
    d = postprocess(scores[:0], boxes[:0])
    assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.proposals.shape == (0,)


def test_vgg16_shapes_match_paper():
    cfg = load_config(None, ["detector.pretrained="])  # build without weights
    assert cfg.detector.trunk == "vgg16"
    m = build_detector(cfg.detector, num_classes=20)
    assert m.trunk.out_channels == 512 and m.trunk.stride == 16
    assert m.roi_pool.output_size == (7, 7) and m.roi_pool.spatial_scale == 1 / 16
    assert (m.fc6.in_features, m.fc6.out_features) == (25088, 4096)
    assert (m.fc7.in_features, m.fc7.out_features) == (4096, 4096)
    assert m.cls_score.out_features == 21 and m.bbox_pred.out_features == 84
    assert m.drop6.p == 0.5 and m.drop7.p == 0.5
    assert 0.005 < m.cls_score.weight.std().item() < 0.015
    assert 0.0005 < m.bbox_pred.weight.std().item() < 0.0015
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert len(frozen) == 8  # conv1_1, conv1_2, conv2_1, conv2_2 weights + biases
    x = torch.zeros(1, 3, 64, 96)
    with torch.inference_mode():
        feats = m.eval().features(x)
        assert feats.shape == (1, 512, 4, 6)
        cls, box = m.head(feats, torch.tensor([[0.0, 0, 0, 60, 40], [0.0, 10, 10, 20, 20]]))
    assert cls.shape == (2, 21) and box.shape == (2, 84)


def _small(extra=()):
    cfg = load_config(None, ["detector.trunk=small", "detector.pretrained=", "detector.fc_dim=64", *extra])
    return build_detector(cfg.detector, num_classes=3)


def test_small_head_and_zero_rois():
    m = _small().eval()
    with torch.inference_mode():
        feats = m.features(torch.zeros(2, 3, 64, 64))
        cls, box = m.head(feats, torch.zeros((0, 5)))
    assert cls.shape == (0, 4) and box.shape == (0, 16)
    assert m.fc6.in_features == 128 * 49


def test_roi_channels_thin_the_map_the_head_pools():
    """detector.roi_channels: a 1x1 convolution + ReLU between trunk and RoI pooling, fc6 sized to it; at the default
    0 the model (and so every checkpoint's weights) is the paper's, with no extra parameters."""
    from core.config import to_dict
    from detector.model import load_detector

    plain = _small()
    assert not any(k.startswith("reduce.") for k in plain.state_dict())
    torch.manual_seed(0)
    m = _small(["detector.roi_channels=16"]).eval()
    assert m.fc6.in_features == 16 * 49 and m.reduce[0].weight.shape == (16, 128, 1, 1)
    x, rois = torch.rand(2, 3, 64, 64), torch.tensor([[0.0, 0, 0, 40, 40], [1.0, 8, 8, 60, 30]])
    with torch.inference_mode():
        feats = m.features(x)
        assert feats.shape[1] == 16 and float(feats.min()) >= 0  # after the ReLU
        assert torch.equal(feats, torch.relu(m.reduce[0](m.trunk(x))))
        cls, box = m(x, rois)
        fast = m.for_inference()(x, rois)[0]  # folded trunk, CPU RoI pooling: the same detector
    assert cls.shape == (2, 4) and box.shape == (2, 16)
    assert torch.allclose(fast, cls, atol=1e-5)
    cfg = load_config(None, ["detector.trunk=small", "detector.pretrained=", "detector.fc_dim=64",
                             "detector.roi_channels=16"])
    m2, _ = load_detector({"model": m.state_dict(), "config": to_dict(cfg), "classes": ["a", "b", "c"]})
    with torch.inference_mode():
        assert torch.equal(m2(x, rois)[0], cls)


def test_truncated_svd_approximates_layer():
    torch.manual_seed(0)
    # a layer with a decaying spectrum (as trained fc layers): rank-t SVD is close
    U, _ = torch.linalg.qr(torch.randn(300, 300))
    V, _ = torch.linalg.qr(torch.randn(500, 300))
    S = torch.exp(-torch.arange(300.0) / 20)
    lin = torch.nn.Linear(500, 300)
    with torch.no_grad():
        lin.weight.copy_(U @ torch.diag(S) @ V.T)
    svd = truncated_svd_linear(lin, 100)
    assert isinstance(svd, torch.nn.Sequential)
    assert svd[0].weight.shape == (100, 500) and svd[1].weight.shape == (300, 100)
    x = torch.randn(64, 500)
    ref, out = lin(x), svd(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.02
    full = truncated_svd_linear(lin, 300)  # no reduction -> unchanged
    assert full is lin
    # applied to a detector: outputs nearly unchanged with ranks close to full
    m = _small().eval()
    x = torch.rand(1, 3, 64, 64)
    rois = torch.tensor([[0.0, 0, 0, 40, 40], [0.0, 8, 8, 60, 50]])
    with torch.inference_mode():
        c0, b0 = m(x, rois)
        m.apply_svd(63, 63)
        c1, b1 = m(x, rois)
    assert isinstance(m.fc6, torch.nn.Sequential)
    assert torch.allclose(c0, c1, atol=1e-2)


def test_detection_loss_normalisation():
    labels = torch.tensor([2, 0, 0, 0])
    logits = torch.zeros(4, 3)
    deltas = torch.zeros(4, 12)
    targets = torch.zeros(4, 4)
    targets[0] = torch.tensor([1.0, 0.0, 0.0, 3.0])  # smooth L1: 0.5 + 0 + 0 + 2.5 = 3
    lc, lb = detection_loss(logits, deltas, labels, targets)
    assert lc.item() == pytest.approx(np.log(3))
    assert lb.item() == pytest.approx(3.0 / 4)  # summed over fg, divided by the RoI count
    deltas[0, 8:12] = targets[0]  # the class-2 slot is the one used
    assert detection_loss(logits, deltas, labels, targets)[1].item() == pytest.approx(0.0)


def test_checkpoint_roundtrip_frozen_bn_and_normalisation():
    from core.config import to_dict
    from detector.model import load_detector

    cfg = load_config(None, ["detector.trunk=small", "detector.pretrained=", "detector.fc_dim=64"])
    for frozen in (False, True):
        torch.manual_seed(0)
        m = build_detector(cfg.detector, 3, frozen_bn=frozen).eval()
        m.trunk.mean, m.trunk.std = (0.4, 0.4, 0.4), (0.2, 0.3, 0.2)
        ckpt = {"model": m.state_dict(), "config": to_dict(cfg), "classes": ["a", "b", "c"],
                "trunk_norm": [list(m.trunk.mean), list(m.trunk.std)]}
        m2, _ = load_detector(ckpt)
        assert m2.trunk.mean == m.trunk.mean and m2.trunk.std == m.trunk.std
        x = torch.rand(1, 3, 64, 64)
        rois = torch.tensor([[0.0, 0, 0, 40, 40]])
        with torch.inference_mode():
            assert torch.allclose(m(x, rois)[0], m2(x, rois)[0], atol=1e-6)


def test_bfloat16_autocast_training_forward_and_backward():
    """detector.train_dtype bfloat16: torchvision's CPU RoIPool has no bfloat16 kernel, so the map is pooled in
    float32 with float32 coordinates; the logits follow the float32 ones to bfloat16 rounding and gradients reach
    the trunk."""
    torch.manual_seed(0)
    m = _small().train()
    m.drop6.p = m.drop7.p = 0.0  # the same forward both times
    images = torch.randn(1, 3, 96, 128)
    rois = torch.cat([torch.zeros(30, 1), _random_boxes(30, size=120, gen=torch.Generator().manual_seed(2))], 1)
    ref, _ = m(images, rois)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, box = m(images, rois)
    assert cls.dtype == torch.bfloat16 and torch.isfinite(cls).all() and torch.isfinite(box).all()
    assert torch.allclose(cls.float(), ref, atol=0.05 * float(ref.abs().max()) + 1e-3)
    (cls.float().logsumexp(1).mean() + box.float().square().mean()).backward()
    grads = [p.grad for p in m.trunk.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert m.fc6.weight.grad.dtype == torch.float32 and float(m.fc6.weight.grad.abs().sum()) > 0
