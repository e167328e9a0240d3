"""Image and box transforms of Fast R-CNN: rescaling (shorter side S, longer side at most MAX) and horizontal flips.

All boxes are float32 ``x1, y1, x2, y2`` with 0-based pixel edges, so a flip maps ``x -> W - x``
exactly (no ``-1`` as in the official code's inclusive convention, fast-rcnn ``imdb.append_flipped_images``).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch


def compute_scale(height: int, width: int, target: int, max_size: int) -> float:
    """Factor that makes the shorter side ``target`` unless the longer side would exceed ``max_size``
    (fast-rcnn ``blob.prep_im_for_blob``: cfg.TRAIN.SCALES / cfg.TRAIN.MAX_SIZE, likewise at test)."""
    short, long = min(height, width), max(height, width)
    scale = float(target) / float(short)
    if round(scale * long) > max_size:
        scale = float(max_size) / float(long)
    return scale


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image by ``scale`` (fast-rcnn uses cv2.resize INTER_LINEAR)."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def flip_image(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror ``x1, y1, x2, y2`` boxes in an image of ``width`` pixels (0-based edges: x -> width - x)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def to_tensor(image: np.ndarray, mean, std) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (3,H,W) float32 normalised with the trunk's mean/std (RGB in [0,1]).

    The official code subtracts Caffe's BGR pixel means; torchvision / efficientnet weights expect RGB mean/std,
    so we use whatever the trunk says: the normalisation its weights were trained with."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:
        image = image.copy()
    t = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)


def pad_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3,H,W) tensors of different sizes into (B,3,Hmax,Wmax), zero-padded at the bottom/right
    (fast-rcnn ``blob.im_list_to_blob``: zeros after mean subtraction)."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
    return out
