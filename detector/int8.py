"""int8 fc6 / fc7 for Fast R-CNN test on CPUs without bfloat16 units (``detector.test_dtype: int8``; not in the paper).

On a CPU without AMX or AVX512-BF16 (e.g. an AVX2-only AMD EPYC Zen 3) the head's float32 fc6 and fc7 dominate the
test at 2000 RoIs, and bfloat16 is emulated there (many times slower). oneDNN's int8 matrix product
(``torch.ops.onednn.qlinear_pointwise``, the kernel TorchInductor's x86 int8 path calls; not the deprecated
``torch.ao.quantization`` modules) computes relu(x W^T + b) from

* weights: symmetric, one scale per output unit, quantised once to 7 bits (-63 .. 63, max |w| / 63): without VNNI
  (AVX2) the kernel multiplies with vpmaddubsw, whose int16 sum of two uint8 x int8 products saturates beyond
  32767 (255 x 127 x 2 = 64770; 1% of a random layer's outputs off by up to 7% of its range in a check here);
  255 x 63 x 2 = 32130 cannot, so every CPU computes the exact integer products (VNNI / AMX accumulate in int32
  anyway). The activations keep 8 bits: their one scale per tensor is the coarser of the two;
* activations: uint8, dynamic (no calibration set), so that every RoI's outputs depend on that RoI and its image
  alone, as in float32 (detector.test slices one pass over the top max(N) proposals for every N):
  - fc6: one scale and zero point per image, of the trunk's map. Its (R, 5488) input is never quantised as such:
    RoI max pooling commutes with the monotone quantisation q(f) = clamp(round(f / s) + z), so the small map is
    quantised once and pooled in uint8 (``detector.roi_pool.roi_max_pool``, empty bins = z, i.e. 0.0), channels
    last (fc6's columns reordered to match once, so the pooled values are not transposed);
  - fc7 (``rowwise``): one scale per RoI of its non-negative input (fc6's ReLU output), applied after the product;
* output float32, ReLU fused into the product (fc6) or applied after the row scales (fc7). cls_score / bbox_pred
  (1024 -> 21 / 84) stay float32.

Outputs move by quantisation error (~1% of a unit's range): the mAP of a trained detector must be measured
against float32 (README "Speed"). On a CPU with int8 dot-product units (AVX512-VNNI; an AMD EPYC Zen 4 with
AVX512-BF16 as well) int8 is also faster than bfloat16: the product at twice the rate, the mAP as close to float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.errors import ConfigError

WEIGHT_MAX = 63  # 7-bit weights: no int16 saturation in AVX2's uint8 x int8 products (module docstring)


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """float tensor -> (uint8 tensor, scale, zero point), one scale for the whole tensor, 0.0 exactly representable."""
    if x.numel() == 0:
        return x.to(torch.uint8), 1.0, 0
    lo, hi = torch.aminmax(x.detach())
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(min(max(round(-lo / scale), 0), 255))
    q = torch.round(x * (1.0 / scale)).add_(zp).clamp_(0, 255).to(torch.uint8)
    return q, scale, zp


class Int8LinearReLU(nn.Module):
    """relu(Linear(x)) with 7-bit int8 weights (per output unit) and uint8 activations (per call), oneDNN on a CPU.

    ``forward(x)`` quantises a float ``x`` itself (one scale for the tensor; ``rowwise``: one per row of a
    non-negative ``x``, e.g. a ReLU's output); ``forward(q, scale, zp)`` takes an already quantised uint8 one.
    ``channels_last=C``: the input is a pooled (bins, C) map flattened bins-first, while ``linear`` was trained on
    torchvision's (C, bins) order; its columns are reordered to match (exact: the integer sums do not depend on
    the order), so the pooling need not transpose."""

    def __init__(self, linear: nn.Linear, channels_last: int = 0, rowwise: bool = False):
        super().__init__()
        self.rowwise = bool(rowwise)
        w = linear.weight.detach().float()
        if channels_last:
            c = int(channels_last)
            w = w.view(w.shape[0], c, -1).transpose(1, 2).reshape(w.shape[0], -1)
        if w.data_ptr() == linear.weight.data_ptr():
            w = w.clone()  # quantised in place below: never the layer's own weights
        # in place, without full-size temporaries (VGG16's 25088 x 4096 fc6 is 411 MB in float32)
        scale = torch.maximum(w.amax(1), w.amin(1).neg_()).clamp_(min=1e-12).div_(WEIGHT_MAX)
        q = w.div_(scale[:, None]).round_().clamp_(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)
        del w
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero_point", torch.zeros(self.out_features, dtype=torch.int64))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        try:
            self.packed = torch.ops.onednn.qlinear_prepack(q, None)
            self(torch.zeros((1, self.in_features), dtype=torch.uint8), 1.0, 0)  # the product runs here
        except (AttributeError, RuntimeError, TypeError) as e:  # a PyTorch without these ops, or other arguments
            raise ConfigError(f"config key 'detector.test_dtype': int8 is not available in PyTorch {torch.__version__} "
                              f"here ({str(e).splitlines()[0][:120]}); use auto or float32") from None

    def forward(self, x: torch.Tensor, scale: float | None = None, zero_point: int | None = None) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.zeros((0, self.out_features), dtype=torch.float32, device=x.device)
        if x.dtype != torch.uint8 and self.rowwise:
            s = x.amax(1, keepdim=True).clamp_(min=1e-30) / 255.0
            q = torch.round(x / s).clamp_(0, 255).to(torch.uint8)
            y = self._product(q, 1.0, 0, None, "none").mul_(s)
            return (y if self.bias is None else y.add_(self.bias)).relu_()
        if x.dtype != torch.uint8:
            x, scale, zero_point = quantize_uint8(x)
        return self._product(x, scale, zero_point, self.bias, "relu")

    def _product(self, q, scale, zero_point, bias, post_op: str) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(q.contiguous(), float(scale), int(zero_point), self.packed,
                                                  self.w_scale, self.w_zero_point, bias, 1.0, 0, torch.float32,
                                                  post_op, [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, "
                f"{'per-row activation scales' if self.rowwise else 'relu fused'}")
