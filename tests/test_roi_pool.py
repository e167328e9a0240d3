"""detector.roi_pool.roi_max_pool gives torchvision's roi_pool numbers (its inference replacement on a CPU)."""
import pytest
import torch
from torchvision.ops import roi_pool

from detector.int8 import quantize_uint8
from detector.roi_pool import roi_max_pool


def _rois(n, b, h, w, gen):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 16.0 + 100, h * 16.0 + 100]) - 50
    wh = torch.rand(n, 2, generator=gen) * 300 * torch.rand(n, 1, generator=gen)
    rois = torch.cat([torch.randint(0, b, (n, 1), generator=gen).float(), xy, xy + wh], 1)
    rois[:40, 1:] = torch.round(rois[:40, 1:] / 8) * 8 + 0.5  # scaled by 1/16: exactly half a cell
    rois[40:50, 1:] = -rois[40:50, 1:]  # reversed and outside the map: empty and clipped bins
    rois[50:60, 3:] = rois[50:60, 1:3]  # zero-size RoIs: one cell
    return rois


@pytest.mark.parametrize("b,c,h,w", [(1, 112, 20, 27), (2, 16, 17, 33), (1, 8, 1, 1), (3, 5, 3, 40)])
@pytest.mark.parametrize("size", [7, 3])
def test_roi_max_pool_equals_torchvision(b, c, h, w, size):
    gen = torch.Generator().manual_seed(h * w + size)
    feats = torch.randn(b, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = _rois(700, b, h, w, gen)
    ref = roi_pool(feats, rois, (size, size), 1 / 16)
    assert (ref == 0).any() and (ref != 0).any()  # the cases include empty bins and filled ones
    out = roi_max_pool(feats, rois, size, 1 / 16)
    assert out.shape == ref.shape == (700, c, size, size) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    # bfloat16 table: equal to torchvision's result rounded to bfloat16 (max commutes with rounding)
    out16 = roi_max_pool(feats.contiguous(), rois, size, 1 / 16, torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, ref.bfloat16())
    # uint8 map (test_dtype int8): pooling commutes with the monotone quantisation, empty bins read the zero point
    q, scale, zp = quantize_uint8(feats)
    assert 0 < zp < 255
    outq = roi_max_pool(q, rois, size, 1 / 16, fill=zp)
    want = torch.round(ref * (1.0 / scale)).add_(zp).clamp_(0, 255).byte()
    assert outq.dtype == torch.uint8 and torch.equal(outq, want)
    last = roi_max_pool(q, rois, size, 1 / 16, fill=zp, channels_last=True)
    assert last.shape == (700, size, size, c) and torch.equal(last, want.permute(0, 2, 3, 1))


def test_roi_max_pool_spatial_scale_and_no_rois():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 4, 30, 30, generator=gen)
    rois = _rois(300, 1, 30, 30, gen) / 2  # spatial scale 1/8 on the same map
    rois[:, 0] = 0
    assert torch.equal(roi_max_pool(feats, rois, 7, 0.125), roi_pool(feats, rois, (7, 7), 0.125))
    none = roi_max_pool(feats, torch.zeros(0, 5), 7, 0.125)
    assert none.shape == (0, 4, 7, 7)
    assert roi_max_pool(feats.byte(), torch.zeros(0, 5), 7, 0.125, fill=9).dtype == torch.uint8
    assert roi_max_pool(feats, torch.zeros(0, 5), 7, 0.125, channels_last=True).shape == (0, 7, 7, 4)


def test_detector_inference_head_uses_same_numbers():
    """FastRCNN.head without gradients (the fast path) gives the logits of the training path (RoIPool)."""
    import torch.nn as nn

    from detector.model import FastRCNN

    class Trunk(nn.Module):
        stride, out_channels = 16, 6

        def forward(self, x):
            return x

    gen = torch.Generator().manual_seed(1)
    model = FastRCNN(Trunk(), 3, nn.Linear(6 * 49, 32), nn.Linear(32, 32), 32).eval()
    feats = torch.randn(1, 6, 12, 15, generator=gen)
    rois = _rois(200, 1, 12, 15, gen)
    with torch.no_grad():
        fast = model.head(feats, rois)
    slow = model.head(feats.requires_grad_(True), rois)  # gradients wanted: torchvision's RoIPool
    assert torch.equal(fast[0], slow[0].detach()) and torch.equal(fast[1], slow[1].detach())
