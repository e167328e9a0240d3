"""BatchNorm frozen for fine-tuning, and BatchNorm folded into the convolutions for fast inference copies."""
from __future__ import annotations

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

    def forward(self, x):
        ih, iw = x.shape[-2:]
        if self.s == 2 and ih % 2 == 0 and iw % 2 == 0 and self.k >= 2:
            return F.conv2d(x, self.grown, self.conv.bias, 2, self.pad, 1, self.conv.groups)
        return self.conv(tf_same_pad(x, self.k, self.s))


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
    out.requires_grad_(False)
    return out.to(memory_format=torch.channels_last) if channels_last else out
