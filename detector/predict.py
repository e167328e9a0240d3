"""Detection on one image in memory: proposals in, scored and regressed boxes out, with the index of the proposal
each detection came from (so a caller can show the DeepMask mask behind it)."""
from __future__ import annotations

import numpy as np
import torch

from .test import detect_image, postprocess
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
    scores, boxes, _ = detect_image(model, tensor, props, scale, h, w)
    d = postprocess(scores, boxes, dcfg.score_thresh, dcfg.test_nms, dcfg.max_dets)
    return {"boxes": d.boxes.numpy().astype(np.float32), "scores": d.scores.numpy().astype(np.float32),
            "labels": d.labels.numpy().astype(np.int64), "proposal": d.proposals.numpy().astype(np.int64)}
