"""Detection on one image in memory: proposals in, scored and regressed boxes out, with the index of the proposal
each detection came from (so a caller can show the DeepMask mask behind it)."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

from .test import detect_image
from .transforms import compute_scale, resize_image, to_tensor


@torch.inference_mode()
def predict(model, image: np.ndarray, proposals: np.ndarray, dcfg) -> dict:
    """``image`` HxWx3 uint8 RGB, ``proposals`` (R,4) 0-based xyxy in its pixels. Fast R-CNN test as in
    detector.test (score threshold, per-class NMS, at most ``max_dets``). Returns numpy arrays: boxes (D,4),
    scores (D,), labels (D,) 0-based class indices, proposal (D,) index of the source proposal."""
    h, w = image.shape[:2]
    scale = compute_scale(h, w, dcfg.test_scale, dcfg.max_size)
    tensor = to_tensor(resize_image(image, scale), model.mean, model.std)
    props = torch.from_numpy(np.ascontiguousarray(proposals, np.float32)).reshape(-1, 4)
    scores, boxes, _ = detect_image(model, tensor, props, scale, h, w, stds=tuple(dcfg.bbox_stds))
    empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
             "labels": np.zeros(0, np.int64), "proposal": np.zeros(0, np.int64)}
    if scores.shape[0] == 0:
        return empty
    s = scores[:, 1:]
    keep = torch.nonzero(s > dcfg.score_thresh)
    if keep.numel() == 0:
        return empty
    r, c = keep[:, 0], keep[:, 1]
    b, sc = boxes[r, c + 1], s[r, c]
    k = batched_nms(b, sc, c, dcfg.test_nms)
    if dcfg.max_dets > 0:
        k = k[: dcfg.max_dets]
    return {"boxes": b[k].numpy().astype(np.float32), "scores": sc[k].numpy().astype(np.float32),
            "labels": c[k].numpy().astype(np.int64), "proposal": r[k].numpy().astype(np.int64)}
