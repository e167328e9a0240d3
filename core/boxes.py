"""Box and mask helpers (numpy). Boxes are float32 x1, y1, x2, y2 with 0-based pixel edges: a box covering
pixels 0..9 is (0, 0, 10, 10). Masks at rest are COCO RLE (pycocotools), in memory boolean arrays."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N,H,W) bool -> (N,4) float32 tight boxes [xmin, ymin, xmax+1, ymax+1]; empty masks give zeros."""
    masks = np.asarray(masks, dtype=bool)
    n = masks.shape[0]
    out = np.zeros((n, 4), np.float32)
    if n == 0:
        return out
    rows = masks.any(axis=2)  # (N,H)
    cols = masks.any(axis=1)  # (N,W)
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    ymin = rows.argmax(axis=1)
    ymax = h - rows[:, ::-1].argmax(axis=1)
    xmin = cols.argmax(axis=1)
    xmax = w - cols[:, ::-1].argmax(axis=1)
    out[:] = np.stack([xmin, ymin, xmax, ymax], axis=1)
    out[~nonempty] = 0
    return out


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    return masks_to_boxes(np.asarray(mask, bool)[None])[0]


def rle_to_boxes(rles: list[dict]) -> np.ndarray:
    """Tight boxes of RLE masks without decoding them (pycocotools toBbox gives x, y, w, h)."""
    if not rles:
        return np.zeros((0, 4), np.float32)
    return xywh_to_xyxy(mask_utils.toBbox(list(rles)).reshape(-1, 4))


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N,H,W) bool -> list of COCO RLE dicts with `counts` as str (JSON-able)."""
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _as_bytes(rle: dict) -> dict:
    c = rle["counts"]
    return {"size": list(rle["size"]), "counts": c.encode("ascii") if isinstance(c, str) else c}


def decode_rles(rles: list[dict]) -> np.ndarray:
    """list of RLE -> (N,H,W) bool."""
    if not rles:
        return np.zeros((0, 0, 0), bool)
    m = mask_utils.decode([_as_bytes(r) for r in rles])
    return m.transpose(2, 0, 1).astype(bool)


def clip_boxes(boxes, height: float, width: float):
    """``(..., 4)`` boxes clipped to the image ``[0, width] x [0, height]`` (0-based edges), in the (height, width)
    order of torchvision.ops.clip_boxes_to_image, which does it; a tensor gives a tensor, anything else a float32
    numpy array."""
    import torch
    from torchvision.ops import clip_boxes_to_image

    if isinstance(boxes, torch.Tensor):
        return clip_boxes_to_image(boxes, (height, width))
    boxes = np.asarray(boxes, np.float32)
    return clip_boxes_to_image(torch.from_numpy(boxes), (height, width)).numpy()


def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain IoU (no +1), (N,4) x (M,4) -> (N,M)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(axis=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes
