"""Fast R-CNN network (Girshick, ICCV 2015, Sec. 2; fast-rcnn ``models/VGG16/train.prototxt``).

trunk (stride 16) -> RoI max pooling 7x7 at spatial scale 1/16 (torchvision.ops.RoIPool; at inference on a CPU
detector.roi_pool, same numbers) -> fc6 -> ReLU -> dropout
-> fc7 -> ReLU -> dropout -> {cls_score: K+1 logits, bbox_pred: 4(K+1) class-specific deltas}.

* 'vgg16': conv1_1 .. conv5_3 (512 channels), fc6 25088->4096 and fc7 4096->4096 initialised from the ImageNet
  classifier when pretrained (core.backbones.vgg16_fc_head), dropout 0.5 (paper Sec. 2.2, 4.1).
* light trunks ('small', 'vgg_a', 'efficientnet_lite0'): fc6/fc7 of width ``fc_dim``, N(0, 0.01) init.
* ``roi_channels`` > 0 (not in the paper): trunk -> 1x1 conv to that many channels -> ReLU -> RoI pooling, so
  pooling and fc6 see a thinner map (Light-Head R-CNN's thin feature map, Li et al. 2017); PyTorch's default init.
* cls_score ~ N(0, 0.01), bbox_pred ~ N(0, 0.001), zero biases (paper Sec. 2.2; fast-rcnn prototxt fillers).
* optional truncated SVD of fc6/fc7 for test (paper Sec. 3.1; fast-rcnn ``tools/compress_net.py``): W (out x in)
  ~= U_t (S_t V_t^T), i.e. a Linear(in, t, no bias) followed by a Linear(t, out) carrying the original bias.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torchvision.ops import RoIPool

from core.backbones import build_trunk, default_frozen_bn, freeze_early_layers, upgrade_state_dict, vgg16_fc_head
from core.errors import CheckpointError, ConfigError

from .int8 import Int8LinearReLU, quantize_uint8
from .roi_pool import roi_max_pool
from .sampling import BoxCoder

log = logging.getLogger(__name__)


class FastRCNN(nn.Module):
    def __init__(self, trunk: nn.Module, num_classes: int, fc6: nn.Module, fc7: nn.Module, fc_dim: int,
                 dropout: float = 0.5, roi_size: int = 7, box_coder: BoxCoder | None = None, roi_channels: int = 0):
        super().__init__()
        self.trunk = trunk
        # the map RoI pooling reads: the trunk's, or (roi_channels > 0) a 1x1 convolution + ReLU of it
        self.reduce = nn.Sequential(nn.Conv2d(trunk.out_channels, roi_channels, 1), nn.ReLU(inplace=True)) \
            if roi_channels else nn.Identity()
        self.box_coder = box_coder or BoxCoder()  # the regression targets' normalisation it is trained with
        self.num_classes = int(num_classes)  # object classes, background excluded
        self.roi_size = int(roi_size)
        self.spatial_scale = 1.0 / trunk.stride
        self.roi_pool = RoIPool((self.roi_size, self.roi_size), self.spatial_scale)
        self.fc6 = fc6
        self.fc7 = fc7
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        self.cls_score = nn.Linear(fc_dim, self.num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, 4 * (self.num_classes + 1))
        nn.init.normal_(self.cls_score.weight, 0.0, 0.01)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.normal_(self.bbox_pred.weight, 0.0, 0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    @property
    def mean(self):
        return self.trunk.mean

    @property
    def std(self):
        return self.trunk.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised images -> (B,C,~H/16,~W/16) feature maps (C: roi_channels where set)."""
        return self.reduce(self.trunk(images))

    def head(self, feats: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI head. ``rois`` (R,5): batch index, x1, y1, x2, y2 in (rescaled) input pixels, 0-based edges.

        roi_pool has Caffe semantics (inclusive end pixel, coordinates rounded), so the exclusive edges x2/y2 are
        turned into the last covered pixel (x2 - 1) as in the official code's inclusive boxes.
        Returns class logits (R,K+1) and class-specific deltas (R,4(K+1))."""
        # coordinates stay float32 (bfloat16 would move them by up to 2 px); torchvision's CPU RoIPool has no
        # bfloat16 kernel, so under bfloat16 autocast the map is pooled in float32
        pool_dtype = feats.dtype if feats.dtype in (torch.float32, torch.float64) else torch.float32
        rois = rois.to(pool_dtype)
        if rois.shape[0] == 0:
            z = feats.new_zeros((0,))
            return z.view(0, self.num_classes + 1), z.view(0, 4 * (self.num_classes + 1))
        r = rois.clone()
        r[:, 3:5] = torch.maximum(r[:, 3:5] - 1, r[:, 1:3])
        if isinstance(self.fc6, Int8LinearReLU):  # test_dtype int8 (detector.int8): the map pooled in uint8
            q, scale, zp = quantize_uint8(feats)
            x = roi_max_pool(q, r, self.roi_size, self.spatial_scale, fill=zp, channels_last=True).flatten(1)
            x = self.fc7(self.fc6(x, scale, zp))
            return self.cls_score(x), self.bbox_pred(x)
        if feats.device.type == "cpu" and not (torch.is_grad_enabled() and feats.requires_grad):
            # inference on a CPU: the same numbers as RoIPool cast to the head's dtype, ~7x faster at 2000 RoIs
            x = roi_max_pool(feats, r, self.roi_size, self.spatial_scale, self.head_dtype).flatten(1)
        else:
            x = self.roi_pool(feats.to(pool_dtype), r).flatten(1).to(self.head_dtype)
        x = torch.relu(self.fc6(x))
        if self.training:  # diagnostic: fraction of active fc6 units (dead ReLUs make the head predict the prior)
            self.fc6_active = float((x > 0).float().mean())
        x = self.drop6(x)
        x = self.drop7(torch.relu(self.fc7(x)))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: torch.Tensor, rois: torch.Tensor):
        return self.head(self.features(images), rois)

    @property
    def head_dtype(self) -> torch.dtype:
        return self.cls_score.weight.dtype

    def for_inference(self, head_dtype: torch.dtype = torch.float32) -> "FastRCNN":
        """An inference copy (eval mode, no gradients): the trunk's BatchNorm folded into its convolutions
        (core.backbones.fuse_for_inference: 2.3x faster trunk on 2 Xeon cores), the RoI head (fc6, fc7, classifier,
        regressor) in ``head_dtype`` -- bfloat16 where the hardware multiplies it natively, e.g. fc6 at 2000 RoIs
        5.8x faster on an AMX Xeon. Outputs equal the model's up to float rounding (bfloat16: ~3 digits).
        ``torch.int8`` (CPU): fc6 / fc7 as int8 products (detector.int8), the classifier and regressor float32."""
        import copy

        from core.backbones import fuse_for_inference

        trunk, self.trunk = self.trunk, None  # not deep-copied twice
        try:
            out = copy.deepcopy(self)
        finally:
            self.trunk = trunk
        out.trunk = fuse_for_inference(trunk)
        if head_dtype == torch.int8:
            if not (isinstance(out.fc6, nn.Linear) and isinstance(out.fc7, nn.Linear)):
                raise ConfigError("config key 'detector.test_dtype': int8 quantises plain fc6 / fc7 layers; it does "
                                  "not combine with detector.svd")
            channels = out.fc6.in_features // (self.roi_size * self.roi_size)  # fc6 reads channels-last bins
            out.fc6 = Int8LinearReLU(out.fc6, channels_last=channels)
            out.fc7 = Int8LinearReLU(out.fc7, rowwise=True)  # its input: fc6's ReLU output
            head_dtype = torch.float32  # the classifier and regressor
        for m in (out.fc6, out.fc7, out.cls_score, out.bbox_pred):
            m.to(head_dtype)
        return out.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------- SVD (Sec. 3.1)
    def apply_svd(self, fc6_rank: int = 1024, fc7_rank: int = 256) -> None:
        """Replace fc6/fc7 by their truncated SVD (test-time speed-up; fast-rcnn tools/compress_net.py)."""
        self.fc6 = truncated_svd_linear(self.fc6, fc6_rank)
        self.fc7 = truncated_svd_linear(self.fc7, fc7_rank)


def truncated_svd_linear(layer: nn.Module, rank: int) -> nn.Module:
    """Linear(in, out) -> Sequential(Linear(in, rank, bias=False), Linear(rank, out)) with W ~= U_t S_t V_t^T.
    Returns ``layer`` unchanged if it is not a plain Linear or the rank would not reduce it."""
    if not isinstance(layer, nn.Linear) or rank <= 0 or rank >= min(layer.in_features, layer.out_features):
        return layer
    W = layer.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_((S[:rank, None] * Vh[:rank]).to(layer.weight.dtype))
        second.weight.copy_(U[:, :rank].to(layer.weight.dtype))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(layer.weight.device)


def default_detector_frozen_bn(dcfg, pretrained: str) -> bool:
    """Whether the detector's trunk trains with frozen BatchNorm when built with weights ``pretrained``:
    core.backbones' default, unless ``dcfg.freeze_bn`` is false."""
    return bool(dcfg.freeze_bn) and default_frozen_bn(dcfg.trunk, pretrained)


def build_detector(dcfg, num_classes: int, pretrained: str | None = None, frozen_bn: bool | None = None) -> FastRCNN:
    """Build Fast R-CNN from a DetectorConfig. ``pretrained`` overrides ``dcfg.pretrained`` (pass '' when the
    weights come from a checkpoint, so no ImageNet file is needed). ``frozen_bn``: BatchNorm of the trunk replaced by
    frozen affine layers (default: core.backbones' choice -- pretrained efficientnet_lite0 / resnet50 -- unless
    ``dcfg.freeze_bn`` is false); 2 images per minibatch are too few for batch statistics."""
    pretrained = dcfg.pretrained if pretrained is None else pretrained
    if frozen_bn is None:
        frozen_bn = default_detector_frozen_bn(dcfg, pretrained)
    trunk = build_trunk(dcfg.trunk, pretrained, frozen_bn=frozen_bn)
    in_dim = (dcfg.roi_channels or trunk.out_channels) * dcfg.roi_size * dcfg.roi_size
    if dcfg.trunk == "vgg16" and dcfg.fc_dim == 4096 and dcfg.roi_size == 7:
        # fc6/fc7 of VGG16, from its ImageNet classifier when pretrained (paper Sec. 2.2)
        fc6, fc7 = vgg16_fc_head(pretrained)
    else:
        # random-init head on a light trunk: N(0, 0.01), zero bias, as torchvision's VGG classifier init (and
        # core.backbones.vgg16_fc_head without weights). He init was tried and is harmful here: RoI max-pooled
        # features are non-negative and large (efficientnet_lite0: initial loss 9 instead of ln 21), the first
        # updates push most fc6 units into a dead ReLU state and the head then only predicts the class prior.
        fc6, fc7 = nn.Linear(in_dim, dcfg.fc_dim), nn.Linear(dcfg.fc_dim, dcfg.fc_dim)
        for fc in (fc6, fc7):
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)
    model = FastRCNN(trunk, num_classes, fc6, fc7, dcfg.fc_dim, dropout=dcfg.dropout, roi_size=dcfg.roi_size,
                     box_coder=BoxCoder.from_config(dcfg), roi_channels=dcfg.roi_channels)
    if dcfg.freeze_early:
        frozen = freeze_early_layers(trunk, dcfg.trunk)
        if frozen:
            log.info("froze %d early trunk parameters (%s .. %s)", len(frozen), frozen[0], frozen[-1])
    # channels-last convolution weights: oneDNN's fast layout on CPU, the activations follow the weights (a training
    # step of the shapes config 1.35x faster on 2 Xeon cores, median of 40 steps; gradients: tests/test_precision.py)
    return model.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------- checkpoints
class DetectorCheckpoint:
    """A trained Fast R-CNN checkpoint (``final.pt``, ``ckpt_<iter>.pt``), read safely and checked to be one:
    errors name ``source``, the file it came from."""

    KEYS = ("model", "config", "classes")

    def __init__(self, data: dict, source="<checkpoint>"):
        self.source = str(source)
        missing = [k for k in self.KEYS if k not in data]
        if missing:
            raise CheckpointError(f"{self.source}: not a Fast R-CNN checkpoint (no {', '.join(map(repr, missing))})")
        self.data = data

    @classmethod
    def read(cls, path) -> "DetectorCheckpoint":
        from core.io import load_checkpoint

        return cls(load_checkpoint(path), path)

    @classmethod
    def of(cls, ckpt) -> "DetectorCheckpoint":
        """A path, a checkpoint dict or a DetectorCheckpoint, as a DetectorCheckpoint."""
        if isinstance(ckpt, DetectorCheckpoint):
            return ckpt
        return cls(ckpt) if isinstance(ckpt, dict) else cls.read(ckpt)

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    def config(self, overrides: list[str] | None = None):
        """The Config it was trained with, with ``--set`` style ``overrides`` applied."""
        from core.config import apply_overrides, from_dict

        return from_dict(apply_overrides(self.data["config"], list(overrides or [])))

    def build(self, device: str = "cpu") -> FastRCNN:
        """The detector of its config with its weights, in eval mode on ``device``."""
        sd = upgrade_state_dict(self.data["model"])  # trunk keys of earlier versions renamed
        # a trunk trained with frozen BatchNorm (FrozenBatchNorm2d: no num_batches_tracked) is rebuilt the same way
        frozen = not any(k.startswith("trunk.") and k.endswith("num_batches_tracked") for k in sd) and \
            any(k.startswith("trunk.") and k.endswith("running_mean") for k in sd)
        model = build_detector(self.config().detector, len(self.classes), pretrained="", frozen_bn=frozen)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"{self.source}: weights do not fit the detector in its config "
                                  f"({str(e).splitlines()[0]})") from None
        if "trunk_norm" in self.data:  # input normalisation depends on the weights loaded at train time (Caffe VGG16)
            model.trunk.mean, model.trunk.std = (tuple(v) for v in self.data["trunk_norm"])
        return model.to(device).eval()


def load_detector(ckpt, device: str = "cpu") -> tuple[FastRCNN, dict]:
    """Rebuild a trained detector from a checkpoint path, dict or :class:`DetectorCheckpoint`; returns (model in eval
    mode, checkpoint dict)."""
    ck = DetectorCheckpoint.of(ckpt)
    return ck.build(device), ck.data
