"""Number formats: 'auto' resolves by the hardware, the inference copy of a detector computes what the detector
computes (float32 to rounding, a bfloat16 head to ~3 digits), and the models train in the channels-last layout with
the gradients of the plain layout."""
import copy
import logging

import pytest
import torch

from core import precision
from core.config import load_config
from core.errors import ConfigError
from detector.model import build_detector
from detector.train import detection_loss

torch.set_num_threads(1)


@pytest.mark.parametrize("flags, want", [({"avx2", "amx_bf16"}, "bfloat16"), ({"avx512_bf16"}, "bfloat16"),
                                         ({"avx2", "avx512f"}, "float32"), (set(), "float32")])
def test_auto_is_bfloat16_only_with_native_units(monkeypatch, caplog, flags, want):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_dtype("auto", "cpu", "k") == (precision.DTYPES[want], want)
    # explicit choices are taken as given, whatever the CPU
    assert precision.resolve_dtype("float32", "cpu", "k") == (torch.float32, "float32")
    precision._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="core.precision"):
        assert precision.resolve_dtype("bfloat16", "cpu", "k") == (torch.bfloat16, "bfloat16")
    # an explicit bfloat16 where it is emulated is honoured, with a warning naming the key
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (want == "float32") and all(m.startswith("k: bfloat16 on a CPU without") for m in warned)
    assert precision.resolve_dtype("auto", "cuda", "k")[1] == "bfloat16"


def test_unknown_dtype_names_the_key():
    with pytest.raises(ConfigError, match="deepmask.infer_dtype.*got 'int8'"):  # int8: the detector's head only
        precision.resolve_dtype("int8", "cpu", "deepmask.infer_dtype")
    with pytest.raises(ConfigError, match="detector.test_dtype.*int8, got 'int4'"):
        precision.resolve_dtype("int4", "cpu", "detector.test_dtype", int8=True)


def _detector(trunk="efficientnet_lite0"):
    cfg = load_config(None, [f"detector.trunk={trunk}", "detector.pretrained=", "detector.fc_dim=64"])
    torch.manual_seed(0)
    model = build_detector(cfg.detector, 4).eval()
    # pretend-trained BatchNorm statistics, so that folding them into the convolutions is not a no-op
    for m in model.trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _inputs(n=300):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 3, 128, 160, generator=g)
    xy = torch.rand(n, 2, generator=g) * 100
    rois = torch.cat([torch.zeros(n, 1), xy, xy + 8 + torch.rand(n, 2, generator=g) * 50], 1)
    return img, rois


def test_inference_copy_computes_the_same_scores_and_deltas():
    model = _detector()
    img, rois = _inputs()
    with torch.inference_mode():
        c0, b0 = model(img, rois)
        fast = model.for_inference(torch.float32)
        c1, b1 = fast(img, rois)
        half = model.for_inference(torch.bfloat16)
        c2, b2 = half(img, rois)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.trunk.modules())  # folded
    assert half.fc6.weight.dtype == half.bbox_pred.weight.dtype == torch.bfloat16
    assert {p.dtype for p in half.trunk.parameters()} == {torch.float32}
    assert torch.allclose(c1, c0, atol=1e-4, rtol=1e-4) and torch.allclose(b1, b0, atol=1e-4, rtol=1e-4)
    p0, p2 = torch.softmax(c0, 1), torch.softmax(c2.float(), 1)
    assert (p2 - p0).abs().max() < 0.02 and (b2.float() - b0).abs().max() < 0.02 * b0.abs().max() + 1e-3
    # the original is untouched: still trainable, float32, with its BatchNorm
    assert model.fc6.weight.dtype == torch.float32 and model.fc6.weight.requires_grad
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.trunk.modules())


def test_channels_last_training_has_the_plain_layouts_gradients():
    """In float64 (no rounding differences between the layouts' kernels) the gradients agree to 1e-10."""
    model = _detector().double().train()
    assert next(model.trunk.parameters()).is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    img, rois = _inputs(64)
    labels = torch.arange(64) % 5
    targets = torch.randn(64, 4, generator=torch.Generator().manual_seed(2)).double()
    grads = []
    for net in (model, plain):
        torch.manual_seed(3)  # the same dropout masks
        loss = sum(detection_loss(*net(img.double(), rois.double()), labels, targets))
        loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-8, atol=1e-10), n
