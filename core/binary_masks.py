"""Binary-mask datasets (e.g. DUTS-TR): a folder of images and a folder of same-named PNG masks.

A mask is read as grey levels and thresholded at 128 (values >= 128 are the object). Each 8-connected component of
at least ``min_area`` (a fraction of the image area) is one object (``objects: components``), or the whole
foreground is one object (``objects: whole``); smaller fragments are skipped. All objects get the one class
``object``. Records carry COCO RLE masks, so DeepMask's sampler reads them like a COCO instances json.

Bad files never stop the load: an image without a mask, an unreadable mask or one whose size is not the image's
is skipped with a warning naming the file (and a count at the end); a set where nothing is usable raises DataError.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .datasets import _EXIF_TRANSPOSE, Record, annotation_orientation
from .errors import DataError
from .images import IMAGE_EXT

log = logging.getLogger(__name__)

OBJECTS = ("components", "whole")
THRESHOLD = 128


def mask_objects(fg: np.ndarray, objects: str = "components", min_area: float = 0.01) -> list[np.ndarray]:
    """The objects of one binary foreground (H, W bool): boolean masks, components largest first (``objects``:
    "components" or "whole", checked by the caller)."""
    import cv2

    h, w = fg.shape
    min_px = float(min_area) * h * w
    if objects == "whole":
        return [fg] if fg.any() and fg.sum() >= min_px else []
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= max(min_px, 1)]
    keep.sort(key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [lab == i for i in keep]


class BinaryMaskDataset:
    """Records of a binary-mask dataset (see the module docstring). ``max_images`` > 0 keeps the first N images
    in name order."""

    classes = ("object",)

    def __init__(self, images, masks, objects: str = "components", min_area: float = 0.01, max_images: int = 0):
        self.image_dir, self.mask_dir = Path(images), Path(masks)
        if objects not in OBJECTS:
            raise DataError(f"{self.mask_dir}: objects must be one of {OBJECTS}, got {objects!r}")
        for d, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not d.is_dir():
                raise DataError(f"{d}: {what} folder not found")
        self.objects, self.min_area = objects, float(min_area)
        files = sorted(q for q in self.image_dir.iterdir() if q.suffix.lower() in IMAGE_EXT and q.is_file())
        if max_images > 0:
            files = files[:max_images]
        if not files:
            raise DataError(f"{self.image_dir}: folder has no images ({', '.join(sorted(IMAGE_EXT))})")
        self.name = f"masks:{self.mask_dir.resolve()}"
        self.records, self.skipped = [], []
        for p in files:
            rec = self._record(p)
            if rec is not None:
                self.records.append(rec)
        if self.skipped:
            log.warning("%s: skipped %d of %d images (first: %s)", self.mask_dir, len(self.skipped), len(files),
                        self.skipped[0])
        if not self.records:
            raise DataError(f"{self.mask_dir}: no usable image/mask pair among {len(files)} images")

    def _skip(self, why: str):
        self.skipped.append(why)
        log.warning("%s", why)

    def _record(self, path: Path) -> Record | None:
        from PIL import Image, UnidentifiedImageError
        from pycocotools import mask as mask_utils

        from .images import raw_size_and_orientation

        mpath = self.mask_dir / (path.stem + ".png")
        if not mpath.is_file():
            self._skip(f"{mpath}: no mask for image {path.name}; skipped")
            return None
        try:
            with Image.open(mpath) as im:
                m = im.convert("L")
                m.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            self._skip(f"{mpath}: unreadable mask ({e}); skipped")
            return None
        w, h, orient = raw_size_and_orientation(path)
        if w == 0:
            self._skip(f"{path}: unreadable image; skipped")
            return None
        shown = (h, w) if orient in (5, 6, 7, 8) else (w, h)
        if m.size not in ((w, h), shown):
            self._skip(f"{mpath}: mask is {m.size[0]}x{m.size[1]}, its image {path.name} is {shown[0]}x{shown[1]}; "
                       "skipped")
            return None
        o = annotation_orientation(path, *m.size)  # a mask on the stored pixels of a rotated photo
        if o != 1:
            m = m.transpose(getattr(Image.Transpose, _EXIF_TRANSPOSE[o]))
        fg = np.asarray(m) >= THRESHOLD
        objs = mask_objects(fg, self.objects, self.min_area)
        H, W = fg.shape
        boxes, segs = [], []
        for ob in objs:
            ys, xs = np.nonzero(ob)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # 0-based pixel edges
            rle = mask_utils.encode(np.asfortranarray(ob.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            segs.append(rle)
        n = len(objs)
        return Record(image_id=path.stem, path=str(path), width=W, height=H,
                      boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.zeros(n, np.int64),
                      difficult=np.zeros(n, bool), iscrowd=np.zeros(n, bool), segmentations=segs)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]
