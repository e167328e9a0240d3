"""detector.test_dtype int8: fc6 / fc7 as oneDNN int8 products on a CPU, close to float32; where it cannot run, a
one-line error naming the key."""
import pytest
import torch

from core import precision
from core.config import load_config
from core.errors import ConfigError
from detector.int8 import WEIGHT_MAX, Int8LinearReLU, quantize_uint8
from tests.test_precision import _detector, _inputs

torch.set_num_threads(1)


def test_quantize_uint8_keeps_zero_and_rounds_to_half_a_step():
    x = torch.randn(300, 50, generator=torch.Generator().manual_seed(0)) * 3 + 1
    q, scale, zp = quantize_uint8(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape and q.min() == 0 and q.max() == 255
    back = (q.float() - zp) * scale
    assert (back - x).abs().max() <= scale / 2 + 1e-6
    assert scale == pytest.approx(float(x.max() - x.min()) / 255, rel=1e-6)
    # 0.0 is a code, so the zero of an empty RoI bin stays exact; an all-positive tensor has zero point 0
    assert (torch.tensor([0.0]) / scale).round() + zp == zp
    q2, s2, z2 = quantize_uint8(torch.rand(10, 10) + 1)
    assert z2 == 0 and s2 > 0


def test_int8_linear_relu_is_close_to_float32():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(500, 64)
    torch.nn.init.normal_(lin.weight, 0, 0.05, generator=g)
    torch.nn.init.normal_(lin.bias, 0, 0.1, generator=g)
    x = torch.randn(200, 500, generator=g)
    ref = torch.relu(lin(x)).detach()
    before = lin.weight.detach().clone()
    q8 = Int8LinearReLU(lin)
    assert torch.equal(lin.weight, before)  # quantised in place, but on a copy: the layer keeps its weights
    out = q8(x)
    assert out.dtype == torch.float32 and out.shape == (200, 64)
    assert (out >= 0).all() and ((out > 0) == (ref > 0)).float().mean() > 0.97  # ReLU fused
    # the kernel computes the exact integer products of the quantised operands on every CPU (with 8-bit weights
    # AVX2's int16 pair sums saturate: ~1% of these outputs were off by up to 0.35)
    q, s, z = quantize_uint8(x)
    w = lin.weight.detach().double()
    ws = w.abs().amax(1) / WEIGHT_MAX
    wq = torch.round(w / ws[:, None]).clamp(-WEIGHT_MAX, WEIGHT_MAX)
    exact = torch.relu(((q.double() - z) @ wq.t()) * s * ws + lin.bias.detach().double())
    assert (out.double() - exact).abs().max() < 1e-5 * exact.max()
    err = (out - ref).abs()  # quantisation error: a step of the activations is 1/255 of their range
    assert err.max() < 0.025 * ref.max() and err.mean() < 0.003 * ref.max()
    # an already quantised input gives the same product
    assert torch.equal(q8(q, s, z), out)
    # a channels-last input (bins first, as the head pools it) against reordered columns: the same integer sums
    last = Int8LinearReLU(lin, channels_last=20)  # 500 inputs = 20 channels x 25 bins
    assert torch.equal(last(q.view(200, 20, 25).transpose(1, 2).reshape(200, 500), s, z), out)
    assert q8(torch.zeros(0, 500)).shape == (0, 64)


def test_rowwise_int8_linear_treats_rows_independently():
    """fc7's form: one activation scale per row of a non-negative input, so a row's output does not depend on the
    other rows (detector.test slices one pass for every N), and is closer to float32 than one scale per tensor."""
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(256, 64)
    torch.nn.init.normal_(lin.weight, 0, 0.05, generator=g)
    x = torch.relu(torch.randn(300, 256, generator=g)) * torch.rand(300, 1, generator=g) * 4  # rows of other ranges
    ref = torch.relu(lin(x)).detach()
    rows, tensor = Int8LinearReLU(lin, rowwise=True), Int8LinearReLU(lin)
    out = rows(x)
    assert out.shape == (300, 64) and (out >= 0).all()
    assert torch.equal(rows(x[:40]), out[:40]) and torch.equal(rows(x[150:]), out[150:])
    small = x.amax(1) < x.max() / 2
    assert not torch.equal(tensor(x[small]), tensor(x)[small])  # one scale for the tensor: rows interact
    err_rows, err_tensor = (out - ref).abs().mean(), (tensor(x) - ref).abs().mean()
    assert err_rows < 0.003 * ref.max() and err_rows < err_tensor
    assert rows(torch.zeros(0, 256)).shape == (0, 64)


def test_int8_detector_is_close_to_float32():
    model = _detector()
    img, rois = _inputs()
    with torch.inference_mode():
        c0, b0 = model.for_inference(torch.float32)(img, rois)
        q = model.for_inference(torch.int8)
        c1, b1 = q(img, rois)
        empty = q(img, torch.zeros(0, 5))
    assert isinstance(q.fc6, Int8LinearReLU) and isinstance(q.fc7, Int8LinearReLU)
    assert q.cls_score.weight.dtype == q.bbox_pred.weight.dtype == torch.float32
    assert c1.shape == c0.shape == (300, 5) and b1.shape == b0.shape == (300, 20)
    p0, p1 = torch.softmax(c0, 1), torch.softmax(c1, 1)
    assert (p1 - p0).abs().max() < 0.02 and (b1 - b0).abs().max() < 0.05 * b0.abs().max()
    assert empty[0].shape == (0, 5) and empty[1].shape == (0, 20)
    # a RoI's scores and deltas depend on it and its image alone: the first N rows of a pass are the pass over N
    with torch.inference_mode():
        c2, b2 = q(img, rois[:100])
    assert torch.equal(c2, c1[:100]) and torch.equal(b2, b1[:100])
    # the original is untouched
    assert isinstance(model.fc6, torch.nn.Linear) and model.fc6.weight.requires_grad


def test_int8_errors_name_the_key(monkeypatch):
    cfg = load_config(None, ["detector.test_dtype=int8"])
    assert cfg.detector.test_dtype == "int8"
    assert precision.resolve_dtype("int8", "cpu", "detector.test_dtype", int8=True) == (torch.int8, "int8")
    with pytest.raises(ConfigError, match="'detector.test_dtype'.*CPU only"):
        precision.resolve_dtype("int8", "cuda", "detector.test_dtype", int8=True)
    with pytest.raises(ConfigError, match="'deepmask.infer_dtype'.*got 'int8'"):
        load_config(None, ["deepmask.infer_dtype=int8"])
    with pytest.raises(ConfigError, match="'detector.test_dtype'.*int8.*got 'int4'"):
        load_config(None, ["detector.test_dtype=int4"])
    model = _detector()
    model.apply_svd(16, 16)
    with pytest.raises(ConfigError, match="'detector.test_dtype'.*detector.svd"):
        model.for_inference(torch.int8)
    # a PyTorch whose oneDNN int8 product fails: one line naming the key, at conversion, not mid-test

    def broken(self, *a):
        raise RuntimeError("qlinear_pointwise: expected other arguments\nmore")

    monkeypatch.setattr(Int8LinearReLU, "forward", broken)
    with pytest.raises(ConfigError, match=r"^config key 'detector.test_dtype': int8 is not available .*other argum"):
        _detector().for_inference(torch.int8)
