"""RoI sampling and bounding-box regression targets of Fast R-CNN.

Sampling follows fast-rcnn ``roi_data_layer/minibatch.py::_sample_rois`` (Girshick, ICCV 2015, Sec. 2.3
"Mini-batch sampling"):

* the ground-truth boxes are added to the RoI set (fast-rcnn ``imdb.create_roidb_from_box_list`` / roidb merge);
* foreground: max IoU with a ground-truth box >= ``fg_thresh`` (0.5), at most ``round(fg_fraction * n)`` of them
  (25%), drawn without replacement;
* background: max IoU in ``[bg_lo, bg_hi)`` = [0.1, 0.5), the rest of the ``n`` RoIs, drawn without replacement.
  RoIs with IoU < 0.1 are never sampled. This is NOT torchvision ``RoIHeads``' rule (there IoU below the low
  threshold is background and the band between the thresholds is ignored), hence this module.
  If there are too few candidates the minibatch is smaller, as in the official code.

Regression targets are the R-CNN parameterisation (Girshick et al. 2014, appendix C; fast-rcnn
``bbox_transform``) divided by fixed stds (0.1, 0.1, 0.2, 0.2): this is py-faster-rcnn's
``BBOX_NORMALIZE_TARGETS_PRECOMPUTED`` option and equals torchvision ``BoxCoder(weights=(10, 10, 5, 5))``. The
original Fast R-CNN code instead estimated per-class means/stds on the training set and folded them into the
weights at snapshot time; the fixed stds avoid that bookkeeping and are what later code settled on. Widths are
``x2 - x1`` without the ``+1`` of the official code because our boxes use 0-based pixel edges
(a box covering pixels 0..9 is 0, 0, 10, 10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

# Fixed normalisation of the targets (py-faster-rcnn BBOX_NORMALIZE_STDS; torchvision BoxCoder weights 10,10,5,5).
BBOX_STDS = (0.1, 0.1, 0.2, 0.2)
# Largest dw/dh before exp() when decoding (torchvision BoxCoder bbox_xform_clip); the official code has no clamp,
# this only prevents overflow for wild predictions.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Fast R-CNN's box regression: targets (dx, dy, dw, dh) that map RoIs onto boxes (fast-rcnn
    ``bbox_transform``), divided by the fixed ``stds`` of the model (the constant lives here, on one object per
    model, as torchvision's ``BoxCoder``)."""

    def __init__(self, stds=BBOX_STDS, clip: float = BBOX_XFORM_CLIP):
        self.stds = tuple(float(v) for v in stds)
        self.clip = float(clip)

    @classmethod
    def from_config(cls, dcfg) -> "BoxCoder":
        return cls(dcfg.bbox_stds)

    def __repr__(self):
        return f"BoxCoder(stds={self.stds})"

    def encode(self, rois: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Normalised targets that map ``rois`` (R,4) onto ``gt`` (R,4)."""
        rois = rois.float()
        gt = gt.float()
        pw = rois[:, 2] - rois[:, 0]
        ph = rois[:, 3] - rois[:, 1]
        px = rois[:, 0] + 0.5 * pw
        py = rois[:, 1] + 0.5 * ph
        gw = gt[:, 2] - gt[:, 0]
        gh = gt[:, 3] - gt[:, 1]
        gx = gt[:, 0] + 0.5 * gw
        gy = gt[:, 1] + 0.5 * gh
        t = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
        return t / t.new_tensor(self.stds)

    def decode(self, rois: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`. ``deltas`` is (R,4) or (R,K,4) (class-specific); returns the same shape
        (fast-rcnn ``bbox_transform_inv``, without the inclusive ``-1`` on x2/y2)."""
        squeeze = deltas.dim() == 2
        if squeeze:
            deltas = deltas[:, None, :]
        deltas = deltas.float() * deltas.new_tensor(self.stds)
        rois = rois.float()
        pw = (rois[:, 2] - rois[:, 0])[:, None]
        ph = (rois[:, 3] - rois[:, 1])[:, None]
        px = rois[:, 0][:, None] + 0.5 * pw
        py = rois[:, 1][:, None] + 0.5 * ph
        dw = deltas[..., 2].clamp(max=self.clip)
        dh = deltas[..., 3].clamp(max=self.clip)
        cx = deltas[..., 0] * pw + px
        cy = deltas[..., 1] * ph + py
        w = torch.exp(dw) * pw
        h = torch.exp(dh) * ph
        out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        return out[:, 0] if squeeze else out


@dataclass
class RoiSample:
    rois: torch.Tensor  # (R,4) float32, image coordinates (before any rescaling)
    labels: torch.Tensor  # (R,) int64; 0 = background, c+1 = dataset class c
    targets: torch.Tensor  # (R,4) float32 normalised regression targets (zeros for background)
    max_iou: torch.Tensor  # (R,) float32, for diagnostics and tests
    num_fg: int


def sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    num_rois: int = 64,
    fg_fraction: float = 0.25,
    fg_thresh: float = 0.5,
    bg_thresh_hi: float = 0.5,
    bg_thresh_lo: float = 0.1,
    generator: torch.Generator | None = None,
    coder: BoxCoder | None = None,
) -> RoiSample:
    """Sample ``num_rois`` RoIs of one image (fast-rcnn ``_sample_rois``), vectorised.

    ``proposals`` (P,4) and ``gt_boxes`` (G,4) float boxes in the same (image) coordinates, ``gt_labels`` (G,) 0-based
    dataset classes. The ground-truth boxes are prepended to the candidates. Returns foreground RoIs first, their
    targets encoded by ``coder`` (default: the fixed stds)."""
    proposals = proposals.reshape(-1, 4).float()
    gt_boxes = gt_boxes.reshape(-1, 4).float()
    gt_labels = gt_labels.reshape(-1).long()
    cand = torch.cat([gt_boxes, proposals], dim=0)
    if gt_boxes.shape[0] == 0 or cand.shape[0] == 0:
        # no object: every candidate has IoU 0 < bg_thresh_lo, so nothing can be sampled (fast-rcnn filter_roidb)
        z = cand.new_zeros((0, 4))
        return RoiSample(z, torch.zeros(0, dtype=torch.long), z.clone(), cand.new_zeros(0), 0)
    iou = box_iou(cand, gt_boxes)  # (C,G), no +1 (0-based edges)
    max_iou, argmax = iou.max(dim=1)
    fg_inds = torch.nonzero(max_iou >= fg_thresh).flatten()
    bg_inds = torch.nonzero((max_iou < bg_thresh_hi) & (max_iou >= bg_thresh_lo)).flatten()

    fg_per_image = int(round(fg_fraction * num_rois))  # np.round in fast-rcnn
    n_fg = min(fg_per_image, fg_inds.numel())
    if n_fg < fg_inds.numel():
        fg_inds = fg_inds[torch.randperm(fg_inds.numel(), generator=generator)[:n_fg]]
    n_bg = min(num_rois - n_fg, bg_inds.numel())
    if n_bg < bg_inds.numel():
        bg_inds = bg_inds[torch.randperm(bg_inds.numel(), generator=generator)[:n_bg]]
    keep = torch.cat([fg_inds, bg_inds])

    rois = cand[keep]
    labels = gt_labels[argmax[keep]] + 1
    labels[n_fg:] = 0
    targets = torch.zeros_like(rois)
    if n_fg:
        targets[:n_fg] = (coder or BoxCoder()).encode(rois[:n_fg], gt_boxes[argmax[keep[:n_fg]]])
    return RoiSample(rois, labels, targets, max_iou[keep], n_fg)
