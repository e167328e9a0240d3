"""Fast R-CNN network (Girshick, ICCV 2015, Sec. 2; fast-rcnn ``models/VGG16/train.prototxt``).

trunk (stride 16) -> RoI max pooling 7x7 at spatial scale 1/16 (torchvision.ops.RoIPool) -> fc6 -> ReLU -> dropout
-> fc7 -> ReLU -> dropout -> {cls_score: K+1 logits, bbox_pred: 4(K+1) class-specific deltas}.

* 'vgg16': conv1_1 .. conv5_3 (512 channels), fc6 25088->4096 and fc7 4096->4096 initialised from the ImageNet
  classifier when pretrained (core.backbones.vgg16_fc_head), dropout 0.5 (paper Sec. 2.2, 4.1).
* light trunks ('small', 'vgg_a', 'efficientnet_lite0'): fc6/fc7 of width ``fc_dim``, N(0, 0.01) init.
* cls_score ~ N(0, 0.01), bbox_pred ~ N(0, 0.001), zero biases (paper Sec. 2.2; fast-rcnn prototxt fillers).
* optional truncated SVD of fc6/fc7 for test (paper Sec. 3.1; fast-rcnn ``tools/compress_net.py``): W (out x in)
  ~= U_t (S_t V_t^T), i.e. a Linear(in, t, no bias) followed by a Linear(t, out) carrying the original bias.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torchvision.ops import RoIPool

from core.backbones import build_trunk, freeze_early_layers, vgg16_fc_head

log = logging.getLogger(__name__)


class FastRCNN(nn.Module):
    def __init__(self, trunk: nn.Module, num_classes: int, fc6: nn.Module, fc7: nn.Module, fc_dim: int,
                 dropout: float = 0.5, roi_size: int = 7):
        super().__init__()
        self.trunk = trunk
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
        """(B,3,H,W) normalised images -> (B,C,~H/16,~W/16) feature maps."""
        return self.trunk(images)

    def head(self, feats: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI head. ``rois`` (R,5): batch index, x1, y1, x2, y2 in (rescaled) input pixels, 0-based edges.

        roi_pool has Caffe semantics (inclusive end pixel, coordinates rounded), so the exclusive edges x2/y2 are
        turned into the last covered pixel (x2 - 1) as in the official code's inclusive boxes.
        Returns class logits (R,K+1) and class-specific deltas (R,4(K+1))."""
        rois = rois.to(feats.dtype)
        if rois.shape[0] == 0:
            z = feats.new_zeros((0,))
            return z.view(0, self.num_classes + 1), z.view(0, 4 * (self.num_classes + 1))
        r = rois.clone()
        r[:, 3:5] = torch.maximum(r[:, 3:5] - 1, r[:, 1:3])
        x = self.roi_pool(feats, r).flatten(1)
        x = torch.relu(self.fc6(x))
        if self.training:  # diagnostic: fraction of active fc6 units (dead ReLUs make the head predict the prior)
            self.fc6_active = float((x > 0).float().mean())
        x = self.drop6(x)
        x = self.drop7(torch.relu(self.fc7(x)))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: torch.Tensor, rois: torch.Tensor):
        return self.head(self.features(images), rois)

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


def build_detector(dcfg, num_classes: int, pretrained: str | None = None, frozen_bn: bool | None = None) -> FastRCNN:
    """Build Fast R-CNN from a DetectorConfig. ``pretrained`` overrides ``dcfg.pretrained`` (pass '' when the
    weights come from a checkpoint, so no ImageNet file is needed). ``frozen_bn``: BatchNorm of the trunk replaced by
    frozen affine layers (default: core.backbones' choice -- pretrained efficientnet_lite0 / resnet50 -- unless
    ``dcfg.freeze_bn`` is false); 2 images per minibatch are too few for batch statistics."""
    pretrained = dcfg.pretrained if pretrained is None else pretrained
    if frozen_bn is None and not dcfg.freeze_bn:
        frozen_bn = False
    trunk = build_trunk(dcfg.trunk, pretrained, frozen_bn=frozen_bn)
    in_dim = trunk.out_channels * dcfg.roi_size * dcfg.roi_size
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
    model = FastRCNN(trunk, num_classes, fc6, fc7, dcfg.fc_dim, dropout=dcfg.dropout, roi_size=dcfg.roi_size)
    if dcfg.freeze_early:
        frozen = freeze_early_layers(trunk, dcfg.trunk)
        if frozen:
            log.info("froze %d early trunk parameters (%s .. %s)", len(frozen), frozen[0], frozen[-1])
    return model
