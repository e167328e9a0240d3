"""BatchNorm frozen for fine-tuning, and BatchNorm folded into the convolutions for fast inference copies."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from .efficientnet import _is_same, conv_bn_pairs, freeze_effnet_batchnorm, tf_same_pad


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by torchvision's ``FrozenBatchNorm2d`` holding the
    same statistics and affine parameters (as buffers: no gradient, no running-stat update, same state-dict keys).
    Returns ``module``. The BatchNorms of a timm EfficientNet become :class:`FrozenBNAct` applied to the kernel of
    the convolution before them (``efficientnet.freeze_effnet_batchnorm``)."""
    freeze_effnet_batchnorm(module)
    _freeze_plain_batchnorm(module)
    return module


def _freeze_plain_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_plain_batchnorm(child)


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A Conv2d computing bn(conv(x)) for an eval-mode BatchNorm2d / FrozenBatchNorm2d ``bn``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused.to(conv.weight.device)


class SamePadConv2d(nn.Module):
    """A stride-2 convolution with its TensorFlow "SAME" padding inside, for inference copies.

    For an even input size the asymmetric padding (pt before, pt + 1 after, pt = (k - 2) // 2) equals a symmetric
    padding of pt + 1 with the kernel grown by one zero row and column at its start: conv2d pads on the fly instead
    of materialising a padded copy of the input (F.pad was ~7% of DeepMask inference on CPU), same values. Odd sizes
    take the explicit padding."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.k, self.s = conv.kernel_size[0], conv.stride[0]
        grown = conv.weight.new_zeros(conv.weight.shape[:2] + (self.k + 1, self.k + 1))
        grown[:, :, 1:, 1:] = conv.weight.detach()
        self.register_buffer("grown", grown)
        self.pad = (self.k - 2) // 2 + 1

    def conv_args(self, x):
        """(input, kernel, padding) of the plain convolution (the inner conv's bias, stride, dilation and groups)
        that computes ``forward(x)``."""
        ih, iw = x.shape[-2:]
        if self.s == 2 and ih % 2 == 0 and iw % 2 == 0 and self.k >= 2:
            return x, self.grown, (self.pad, self.pad)
        return tf_same_pad(x, self.k, self.s), self.conv.weight, self.conv.padding

    def forward(self, x):
        x, w, pad = self.conv_args(x)
        c = self.conv
        return F.conv2d(x, w, c.bias, c.stride, pad, c.dilation, c.groups)


def fuse_for_inference(trunk: nn.Module, channels_last: bool = True) -> nn.Module:
    """An inference copy of ``trunk`` (eval mode, no gradients): every BatchNorm that directly follows a convolution
    is folded into it (conv/BN pairs in an ``nn.Sequential``, the ``convN``/``bnN`` attribute pairs of the ResNet
    blocks and stem, the conv/BN pairs of timm's EfficientNet blocks), EfficientNet's stride-2 "SAME" padding
    happens inside the convolution (SamePadConv2d), and the weights are channels-last (oneDNN's fast layout on CPU; feed channels-last
    input). The outputs equal the trunk's in eval mode up to float rounding; the copy does not follow later changes
    of ``trunk``'s weights."""
    import copy

    bn_types = (nn.BatchNorm2d, FrozenBatchNorm2d)
    out = copy.deepcopy(trunk).eval()
    for parent, conv_name, bn_name in list(conv_bn_pairs(out)):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(bn, bn_types):
            same = getattr(conv, "same", False) or _is_same(conv)
            fused = _fold_into(conv, bn)
            setattr(parent, conv_name, SamePadConv2d(fused) if same else fused)
            setattr(parent, bn_name, getattr(bn, "act", None) or nn.Identity())

    def visit(m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            kids = list(m._modules.items())
            for (n1, a), (n2, b) in zip(kids, kids[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, bn_types):
                    m._modules[n1], m._modules[n2] = _fold_into(a, b), nn.Identity()
        for name, child in list(m.named_children()):
            if isinstance(child, nn.Conv2d):
                bn_name = "bn" + name[len("conv"):] if name.startswith("conv") else None
                bn = getattr(m, bn_name, None) if bn_name else None
                if isinstance(bn, bn_types):
                    setattr(m, name, _fold_into(child, bn))
                    setattr(m, bn_name, nn.Identity())
            else:
                visit(child)

    visit(out)
    _fuse_activations(out)
    out.requires_grad_(False)
    return out.to(memory_format=torch.channels_last) if channels_last else out


@functools.cache
def _pointwise_conv_op():
    """oneDNN's convolution with a fused elementwise post-op (the op TorchInductor's CPU backend calls), or None
    where this PyTorch build lacks it or this CPU has no oneDNN bfloat16 path (the op's bfloat16 call needs
    AVX512-BW/VL/DQ or AVX-NE-CONVERT and raises elsewhere, e.g. on an AVX2-only AMD EPYC Zen 3, where plain
    bfloat16 convolutions still run on ATen's slower kernels)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


_ACTS = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}


class ConvAct(nn.Module):
    """act(conv(x)) of an inference copy, in bfloat16 on the CPU in one oneDNN call: the activation runs as the
    convolution's post-op on each output tile while it is in cache, instead of one more pass over the whole map
    (ReLU6 in bfloat16 was ~15% of DeepMask inference on 2 Xeon cores; a 1x1 convolution + ReLU6 0.93 -> 0.49 ms on
    a 96 x 250 x 188 map). The post-op clamps the float accumulator before the one rounding to bfloat16, and 0 and 6
    are exact in bfloat16, so the values are those of the two layers -- provided oneDNN computes the convolution
    the same way with the post-op attached: the first bfloat16 call of each layer computes both and keeps the fused
    call only if they are equal bit for bit (on the Xeon with AMX every layer is). float32 keeps the two layers
    (there oneDNN picks other kernels with the post-op: last-bit differences), as do CUDA and autograd. ``conv``:
    a Conv2d or a SamePadConv2d, whose weights it uses (its forward, and so its hooks, never run)."""

    def __init__(self, conv: nn.Module, act: nn.Module):
        super().__init__()
        self.conv = conv
        self.attr, self.scalars = _ACTS[type(act)]
        self.fused_ok = None  # whether the fused call equals the two layers here (checked on the first call)

    def forward(self, x):
        c = self.conv
        if isinstance(c, SamePadConv2d):
            x, w, padding = c.conv_args(x)
            c = c.conv
        else:
            w, padding = c.weight, c.padding
        args = (c.bias, list(padding), list(c.stride), list(c.dilation), c.groups, self.attr, self.scalars, "")
        op = None
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 == w.dtype and self.fused_ok is not False
                and not (torch.is_grad_enabled() and x.requires_grad)):
            op = _pointwise_conv_op()
        if op is not None and self.fused_ok:
            return op(x, w, *args)
        out = F.conv2d(x, w, c.bias, c.stride, padding, c.dilation, c.groups)
        out = F.hardtanh_(out, 0.0, 6.0) if self.attr == "hardtanh" else F.relu_(out)
        if op is not None:  # first bfloat16 call: fuse from now on only if it gives these very values
            self.fused_ok = bool(torch.equal(op(x, w, *args), out))
        return out

    def extra_repr(self) -> str:
        return f"post-op {self.attr}"


def _fuse_activations(root: nn.Module) -> None:
    """Fold each ReLU / ReLU6 that directly follows a convolution into it (ConvAct): in timm's EfficientNet blocks
    the activation left where the folded BatchNorm + activation layer was (the pairs of ``conv_bn_pairs``), in an
    ``nn.Sequential`` a conv [, Identity], ReLU run."""
    if _pointwise_conv_op() is None:
        return
    convs = (nn.Conv2d, SamePadConv2d)

    def fusable(c, act):
        base = c.conv if isinstance(c, SamePadConv2d) else c
        return (isinstance(c, convs) and isinstance(base, nn.Conv2d) and base.padding_mode == "zeros"
                and not isinstance(base.padding, str) and type(act) in _ACTS)

    pairs = list(conv_bn_pairs(root)) + [(m, "conv_stem", "bn1") for m in root.modules()
                                         if isinstance(getattr(m, "conv_stem", None), SamePadConv2d)]
    for parent, conv_name, act_name in pairs:
        conv, act = getattr(parent, conv_name), getattr(parent, act_name)
        if fusable(conv, act):
            setattr(parent, conv_name, ConvAct(conv, act))
            setattr(parent, act_name, nn.Identity())
    for m in list(root.modules()):
        if isinstance(m, nn.Sequential):
            kids = list(m._modules.items())
            for i, (n1, a) in enumerate(kids):
                j = i + 1
                while j < len(kids) and isinstance(kids[j][1], nn.Identity):
                    j += 1
                if j < len(kids) and fusable(a, kids[j][1]):
                    m._modules[n1], m._modules[kids[j][0]] = ConvAct(a, kids[j][1]), nn.Identity()
