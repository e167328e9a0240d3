"""Weight files of the trunks: torchvision's ImageNet files from the local torch hub cache (never downloaded unless
asked), state-dict files read as plain data, and a strict loader that names the file and the first offending key."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from core.errors import CheckpointError
from core.io import load_checkpoint

log = logging.getLogger(__name__)

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


def imagenet_tv_state_dict(name: str, allow_download: bool) -> tuple[dict, str]:
    """Torchvision ImageNet state dict of trunk ``name`` from the local hub cache (or downloaded if allowed)."""
    builder, weights = _tv_weight_enum(name)
    path = torchvision_weight_file(name)
    if path.is_file():
        return read_state_dict(path), str(path)
    if allow_download:
        log.info("downloading %s ImageNet weights (%s) to %s", name, weights, path)
        sd = weights.get_state_dict(progress=False, check_hash=True)
        return sd, str(path)
    raise CheckpointError(
        f"ImageNet weights for trunk '{name}' not found: expected {path} (the torch hub cache, "
        f"$TORCH_HOME/hub/checkpoints); put the file there, or when online create it with: "
        f"python -c \"import torchvision; torchvision.models.{builder}(weights='{weights.name}')\"")


def read_state_dict(path) -> dict:
    """Read a state dict file; unwraps {'model': sd} / {'state_dict': sd}. CheckpointError naming the file."""
    obj = load_checkpoint(path, what="weight file")  # weights_only=True: plain data, never code
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def load_into(module: nn.Module, sd: dict, source: str, *, ignore: Callable[[str], bool] = lambda k: False) -> None:
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
