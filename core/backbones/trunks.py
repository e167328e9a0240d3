"""The torchvision-based and small trunks (see core/backbones/__init__.py for the common interface), the VGG16
fc6 / fc7 head of Fast R-CNN, and which early layers a detector keeps frozen."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from core.errors import CheckpointError, ConfigError

from .weights import imagenet_tv_state_dict, load_into, read_state_dict

# torchvision ImageNet weights (IMAGENET1K_V1) expect RGB in [0, 1] normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision VGG16_Weights.IMAGENET1K_FEATURES (Caffe VGG16) normalisation.
VGG16_CAFFE_MEAN = (0.48235, 0.45882, 0.40784)
VGG16_CAFFE_STD = (1.0 / 255.0,) * 3


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
        load_into(self, sd, source, ignore=lambda k: not k.startswith("features."))


def _conv_indices(seq: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]


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
            sd, source = imagenet_tv_state_dict("vgg16", allow_download)
        else:
            sd, source = read_state_dict(pretrained), str(pretrained)
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
            load_into(fc, sub, f"{source} [classifier.{idx}]")
    if as_sequential:
        return nn.Sequential(fc6, nn.ReLU(inplace=True), nn.Dropout(0.5), fc7, nn.ReLU(inplace=True), nn.Dropout(0.5))
    return fc6, fc7


def freeze_early_layers(trunk: nn.Module, name: str | None = None) -> list[str]:
    """Freeze (requires_grad=False) the early layers of ``trunk``; returns the frozen parameter names.

    * vgg16: conv1_1 .. conv2_2 (Fast R-CNN, fast-rcnn VGG16 train prototxt: lr_mult 0 below conv3_1);
    * vgg_a: conv1_1 and conv2_1 (the same cut: everything below conv3);
    * efficientnet_liteN: stem conv + BN and stage 0 (stride 2, as detectron-style fine-tuning);
    * resnet50: conv1 + bn1 + layer1 (py-faster-rcnn / torchvision detection default; BN is frozen anyway);
    * small: nothing (trained from scratch)."""
    name = name or getattr(trunk, "name", None)
    if name in ("vgg16", "vgg_a"):
        convs = _conv_indices(trunk.features)
        pools = [i for i, m in enumerate(trunk.features) if isinstance(m, nn.MaxPool2d)]
        cut = pools[1]  # everything before the second max-pool: conv1_x, conv2_x
        prefixes = [f"features.{i}." for i in convs if i < cut]
    elif name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        prefixes = ["conv_stem.", "bn1.", "blocks.0."]
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
