"""DeepMask network (Pinheiro, Collobert, Dollar, NIPS 2015, §3.1 and §3.4).

A shared trunk at stride 16 followed by two branches:

* segmentation (§3.1 "Segmentation", §3.4): 1x1 conv (``seg_channels``, 512 in the paper) + ReLU, a linear layer
  to a ``lowrank_dim`` (512) "low-rank" vector with no non-linearity, a linear layer to ``mask_size`` x
  ``mask_size`` (56x56) pixel classifiers, then a FIXED (non-trainable) bilinear upsampling to the patch size
  (224). ``head='full'`` is DeepMaskFull (Table 1): each 56x56 output connected directly to the conv features
  (no low-rank layer, >300M parameters with VGG-A).
* scoring (§3.1 "Scoring", §3.4): 2x2 max-pool, FC 512 + ReLU + dropout 0.5, FC 1024 + ReLU + dropout 0.5,
  linear 1.

With the VGG-A trunk the model has ~75M parameters, as the paper says (tests/test_deepmask_model.py).

Full-scene inference (§3.3) re-uses the very same weights as convolutions: see :meth:`DeepMask.dense_scores`,
:meth:`DeepMask.dense_masks` and :meth:`DeepMask.masks_at`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError

__all__ = ["DeepMask", "build_deepmask", "upsample_masks", "COCO_PASCAL_CATEGORIES"]

# The 20 PASCAL VOC categories under their MS COCO names (DeepMask20, paper §4 "Generalization"), in VOC order
# (aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, horse, motorbike, person,
# pottedplant, sheep, sofa, train, tvmonitor).
COCO_PASCAL_CATEGORIES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch", "train", "tv",
)


def upsample_masks(mask_logits: torch.Tensor, size: int) -> torch.Tensor:
    """Fixed bilinear upsampling of (B, m, m) mask logits to (B, size, size) (§3.4: "a final bilinear upsampling
    layer ... non-trainable"). ``align_corners=False``: output pixel centres map to input pixel centres with the
    half-pixel convention, the same mapping full-scene inference uses when it pastes masks (infer.py)."""
    return F.interpolate(mask_logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


class DeepMask(nn.Module):
    """DeepMask on a trunk (``core.backbones`` interface: ``out_channels``, ``stride == 16``, ``normalize``).

    ``forward(x)`` takes normalised (B, 3, P, P) patches and returns ``(mask_logits (B, m, m), score (B,))``;
    :func:`upsample_masks` gives the (B, P, P) logits the loss of eq. (1) is computed on."""

    def __init__(self, trunk: nn.Module, *, head: str = "lowrank", seg_channels: int = 512, lowrank_dim: int = 512,
                 mask_size: int = 56, patch_size: int = 224, score_hidden=(512, 1024), dropout: float = 0.5):
        super().__init__()
        stride = int(getattr(trunk, "stride", 16))
        if patch_size % stride:
            raise ConfigError(f"config key 'deepmask.patch_size': {patch_size} is not a multiple of the trunk stride "
                              f"{stride}")
        f = patch_size // stride
        if f < 2:
            raise ConfigError(f"config key 'deepmask.patch_size': {patch_size} gives a {f}x{f} feature map; the "
                              f"scoring branch's 2x2 max-pool needs at least 2x2 (patch_size >= {2 * stride})")
        if head not in ("lowrank", "full"):
            raise ConfigError(f"config key 'deepmask.head': '{head}' (choose lowrank or full)")
        if len(score_hidden) != 2:
            raise ConfigError("config key 'deepmask.score_hidden': expected two sizes (512, 1024 in the paper)")
        self.trunk = trunk
        self.head = head
        self.patch_size = int(patch_size)
        self.mask_size = int(mask_size)
        self.feat_size = f
        self.pool_size = f // 2  # 2x2 max-pool, floor mode (14 -> 7)
        c = int(trunk.out_channels)
        # --- segmentation branch (§3.1, §3.4)
        self.seg_conv = nn.Conv2d(c, seg_channels, 1)
        if head == "lowrank":
            self.seg_lowrank = nn.Linear(seg_channels * f * f, lowrank_dim)  # no non-linearity after it (§3.1)
            self.seg_out = nn.Linear(lowrank_dim, mask_size * mask_size)
        else:  # DeepMaskFull: every pixel classifier sees the whole feature map directly
            self.seg_lowrank = None
            self.seg_out = nn.Linear(seg_channels * f * f, mask_size * mask_size)
        # --- scoring branch (§3.1, §3.4)
        h1, h2 = (int(h) for h in score_hidden)
        self.score_fc1 = nn.Linear(c * self.pool_size * self.pool_size, h1)
        self.score_fc2 = nn.Linear(h1, h2)
        self.score_fc3 = nn.Linear(h2, 1)
        self.dropout = nn.Dropout(dropout)
        # Weights: PyTorch's default initialisation of Conv2d/Linear is uniform (kaiming-uniform), matching §3.4
        # "aside from the pre-trained VGG features, weights are initialized randomly from a uniform distribution".

    # ------------------------------------------------------------------------------------------ patch model
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) RGB float in [0,1] -> trunk input."""
        return self.trunk.normalize(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def _check_feat(self, feat: torch.Tensor) -> None:
        if feat.shape[-2:] != (self.feat_size, self.feat_size):
            raise ConfigError(
                f"trunk '{getattr(self.trunk, 'name', '?')}' maps a {self.patch_size}x{self.patch_size} patch to a "
                f"{tuple(feat.shape[-2:])} feature map, expected {self.feat_size}x{self.feat_size} "
                f"(config key 'deepmask.patch_size')")

    def mask_head(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, f, f) -> (B, m, m) mask logits."""
        s = F.relu(self.seg_conv(feat)).flatten(1)
        if self.seg_lowrank is not None:
            s = self.seg_lowrank(s)
        return self.seg_out(s).view(-1, self.mask_size, self.mask_size)

    def score_head(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, f, f) -> (B,) score logits."""
        p = F.max_pool2d(feat, 2).flatten(1)
        h = self.dropout(F.relu(self.score_fc1(p)))
        h = self.dropout(F.relu(self.score_fc2(h)))
        return self.score_fc3(h)[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(x)
        self._check_feat(feat)
        return self.mask_head(feat), self.score_head(feat)

    # ------------------------------------------------------------------- full-scene (convolutional) model
    # §3.3: "all computations can be computed convolutionally". The Linear weights are reshaped (views, no
    # copies) into convolution kernels, so one pass over a (B, C, Hf, Wf) feature map of a whole image gives, at
    # every offset (u, v) with 0 <= u <= Hf - f, 0 <= v <= Wf - f, exactly what the patch model gives on the
    # feature window feat[:, :, u:u+f, v:v+f], i.e. on the patch whose top-left corner is at (16u, 16v) pixels.
    def dense_scores(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, Hf, Wf) -> (B, Hf-f+1, Wf-f+1) score logits, one per 16-px step.

        The patch model max-pools 2x2 with stride 2, so a plain convolutional version would give scores at a
        32-px step only; the paper uses OverFeat's interleaving trick [26] (pool at offsets 0 and 1 in each
        direction, run the rest on the 4 pooled maps and interleave). Equivalent formulation used here: max-pool
        2x2 with stride 1 (Q[i,j] = max feat[i:i+2, j:j+2]), then the first FC layer as a pool_size x pool_size
        convolution with dilation 2: at offset (u, v) it reads Q[u+2a, v+2b] = pooled_window[a, b] -- the same
        values as the patch model, at every 16-px position, in one convolution. FC2 and FC3 become 1x1 convs."""
        k = self.pool_size
        q = F.max_pool2d(feat, 2, stride=1)
        w1 = self.score_fc1.weight.view(self.score_fc1.out_features, -1, k, k)
        h = F.relu(F.conv2d(q, w1, self.score_fc1.bias, dilation=2))
        h = F.relu(F.conv2d(h, self.score_fc2.weight[:, :, None, None], self.score_fc2.bias))
        s = F.conv2d(h, self.score_fc3.weight[:, :, None, None], self.score_fc3.bias)[:, 0]
        n_y, n_x = feat.shape[-2] - self.feat_size + 1, feat.shape[-1] - self.feat_size + 1
        return s[:, :n_y, :n_x]  # odd feat_size: the floor-mode pool ignores the last row/column; crop to match

    def seg_features(self, feat: torch.Tensor) -> torch.Tensor:
        """1x1 conv + ReLU of the segmentation branch over a whole feature map: (B, seg_channels, Hf, Wf)."""
        return F.relu(self.seg_conv(feat))

    def dense_masks(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, Hf, Wf) -> (B, m*m, Hf-f+1, Wf-f+1) mask logits at every 16-px step: the low-rank Linear over
        the f x f x seg_channels field becomes an f x f convolution, the 56x56 classifier a 1x1 convolution to
        m*m channels (§3.3). Memory grows as m*m per position: full-scene inference uses :meth:`masks_at` on the
        selected top candidates instead (same weights, same values)."""
        s = self.seg_features(feat)
        f = self.feat_size
        first = self.seg_lowrank if self.seg_lowrank is not None else self.seg_out
        h = F.conv2d(s, first.weight.view(first.out_features, -1, f, f), first.bias)
        if self.seg_lowrank is not None:
            h = F.conv2d(h, self.seg_out.weight[:, :, None, None], self.seg_out.bias)
        return h

    def masks_at(self, seg_feat: torch.Tensor, b: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Mask logits (K, m, m) at K positions (batch index b, offsets ys, xs) of :meth:`seg_features` output:
        the f x f convolution of :meth:`dense_masks` evaluated only where it is needed (a gathered window times
        the same weights)."""
        f = self.feat_size
        if len(ys) == 0:
            return seg_feat.new_zeros((0, self.mask_size, self.mask_size))
        r = torch.arange(f, device=seg_feat.device)
        yy = (ys[:, None] + r)[:, :, None]  # (K, f, 1)
        xx = (xs[:, None] + r)[:, None, :]  # (K, 1, f)
        win = seg_feat[b[:, None, None], :, yy, xx]  # (K, f, f, C): advanced indices first, then the channel
        win = win.permute(0, 3, 1, 2).flatten(1)  # (K, C*f*f) in the (c, y, x) order of the patch model's flatten
        h = win
        if self.seg_lowrank is not None:
            h = self.seg_lowrank(h)
        return self.seg_out(h).view(-1, self.mask_size, self.mask_size)


def build_deepmask(dm, *, pretrained: bool = True, frozen_bn: bool | None = None) -> DeepMask:
    """DeepMask from a ``core.config.DeepMaskConfig``; ``pretrained=False`` skips loading trunk weights (tests,
    and models about to receive a checkpoint); ``frozen_bn``: as ``core.backbones.build_trunk``."""
    from core.backbones import build_trunk

    trunk = build_trunk(dm.trunk, dm.pretrained if pretrained else "", frozen_bn=frozen_bn)
    model = DeepMask(trunk, head=dm.head, seg_channels=dm.seg_channels, lowrank_dim=dm.lowrank_dim,
                     mask_size=dm.mask_size, patch_size=dm.patch_size,
                     score_hidden=tuple(getattr(dm, "score_hidden", (512, 1024))),
                     dropout=float(getattr(dm, "dropout", 0.5)))
    # channels-last convolution weights: oneDNN's fast layout on CPU, the activations follow the weights (a training
    # step of the shapes config 1.35x faster on 2 Xeon cores, median of 40 steps; gradients: tests/test_precision.py)
    return model.to(memory_format=torch.channels_last)
