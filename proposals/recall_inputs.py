"""The inputs of proposal recall (proposals/recall.py): the ground truth as a pycocotools COCO object (from a COCO
json, or from VOC records with difficult objects as ``iscrowd``), and proposals from a COCO results json or a
store, their image ids mapped onto the ground truth's."""
from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from core.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class RecallGT:
    """Ground truth for recall: a pycocotools COCO object plus the map from our image ids to its int ids."""

    coco: object  # pycocotools.coco.COCO
    id_map: dict  # our image id (str) -> COCO int image id
    has_masks: bool
    name: str = ""

    def coco_id(self, image_id) -> int:
        key = image_id if isinstance(image_id, str) else str(image_id)
        if key in self.id_map:
            return self.id_map[key]
        if key.isdigit() and str(int(key)) in self.id_map:
            # a VOC-style zero-padded id ('000241') of a COCO json whose int id is 241 (the synthetic set)
            return self.id_map[str(int(key))]
        raise DataError(f"results name image id {image_id!r}, which is not in the ground truth "
                        f"{self.name}") from None


def _quiet_coco(dataset: dict):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def gt_from_coco(ann_file) -> RecallGT:
    """A COCO instances json as is (crowd objects are ignored by COCOeval, as in the official evaluation)."""
    from core.datasets import load_coco

    coco = load_coco(ann_file)
    ids = coco.getImgIds()
    if not ids:
        raise DataError(f"{ann_file}: no images")
    from pycocotools import mask as mask_utils

    for a in coco.anns.values():  # COCOeval needs bbox, area, iscrowd on every object
        b = a.get("bbox")
        if not isinstance(b, list) or len(b) != 4:
            raise DataError(f"{ann_file}: annotation {a.get('id')} of image {a.get('image_id')} has no valid bbox")
        if a.get("id", 0) == 0:  # COCOeval reads a match on gt id 0 as 'no match'
            raise DataError(f"{ann_file}: annotation ids must be positive (image {a.get('image_id')})")
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(mask_utils.area(coco.annToRLE(a))) if a.get("segmentation") else \
                float(b[2]) * float(b[3])
    has_masks = bool(coco.anns) and all(a.get("segmentation") for a in coco.anns.values())
    return RecallGT(coco, {str(i): int(i) for i in ids}, has_masks, str(ann_file))


def gt_from_records(records: Iterable, classes: Sequence[str] | None = None, name: str = "") -> RecallGT:
    """Records (VOCDataset, CocoDataset or a list) -> in-memory COCO ground truth.

    Image ids are numbered 1.. in record order; boxes are 0-based edges -> COCO x, y, w, h; area = box area when
    there is no mask, else the mask area; difficult (and crowd) objects -> iscrowd = 1 (ignored, see module doc).
    """
    from pycocotools import mask as mask_utils

    records = list(records)
    if not records:
        raise DataError(f"ground truth {name}: no images")
    if classes is None:
        classes = [f"class{i}" for i in range(1 + max((int(r.labels.max()) for r in records if len(r.labels)),
                                                      default=0))]
    images, anns = [], []
    id_map = {}
    has_masks = all(r.segmentations is not None for r in records)
    for k, r in enumerate(records, 1):
        if r.image_id in id_map:
            raise DataError(f"ground truth {name}: image id {r.image_id!r} listed twice")
        id_map[str(r.image_id)] = k
        images.append({"id": k, "width": int(r.width), "height": int(r.height), "file_name": str(r.path)})
        rles = r.mask_rles() if has_masks else None
        ign = np.asarray(r.difficult, bool) | np.asarray(r.iscrowd, bool)
        for j, (box, lab) in enumerate(zip(np.asarray(r.boxes, np.float64), np.asarray(r.labels))):
            x1, y1, x2, y2 = (float(v) for v in box)
            a = {"id": len(anns) + 1, "image_id": k, "category_id": int(lab) + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(ign[j])}
            if rles is not None:
                a["segmentation"] = rles[j]
                a["area"] = float(mask_utils.area(rles[j]))
            else:
                a["area"] = (x2 - x1) * (y2 - y1)
            anns.append(a)
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    coco = _quiet_coco({"images": images, "annotations": anns, "categories": cats})
    return RecallGT(coco, id_map, has_masks, name)


# ------------------------------------------------------------------------------------------------- results


def _rle(seg, h: int, w: int, where: str) -> dict:
    from pycocotools import mask as mask_utils

    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        if size != [h, w]:
            raise DataError(f"{where}: mask size {size} differs from the image size [{h}, {w}]")
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, h, w)
        counts = seg["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if not isinstance(counts, bytes):
            raise DataError(f"{where}: RLE counts must be a string")
        return {"size": size, "counts": counts}
    if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):  # polygons
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            raise DataError(f"{where}: empty polygon")
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    raise DataError(f"{where}: 'segmentation' must be a COCO RLE {{size, counts}} or polygons")


def prepare_results(gt: RecallGT, results, iou_type: str = "bbox", source: str = "results") -> list[dict]:
    """Validate a COCO results list and map it onto gt: int image ids, one category (useCats = 0 needs a
    category id that COCOeval's catIds contain: the ground truth's first), 'bbox' for box recall (from the
    mask when only a mask is given, as DeepMask's boxes are the masks' tight boxes), compressed RLE for 'segm'.
    Raises DataError naming the entry for anything malformed."""
    from pycocotools import mask as mask_utils

    if iou_type not in ("bbox", "segm"):
        raise DataError(f"iou type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == "segm" and not gt.has_masks:
        raise DataError(f"ground truth {gt.name} has no instance masks: use --iou-type bbox")
    if not isinstance(results, list):
        raise DataError(f"{source}: expected a JSON list of results, got {type(results).__name__}")
    cat_ids = sorted(gt.coco.getCatIds())
    cat = cat_ids[0] if cat_ids else 1
    out = []
    for k, r in enumerate(results):
        where = f"{source}: entry {k}"
        if not isinstance(r, dict) or "image_id" not in r or "score" not in r:
            raise DataError(f"{where}: needs 'image_id' and 'score'")
        img_id = gt.coco_id(r["image_id"])
        try:
            score = float(r["score"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: score {r['score']!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: non-finite score")
        img = gt.coco.imgs[img_id]
        h, w = int(img.get("height", 0)), int(img.get("width", 0))
        d = {"image_id": img_id, "category_id": cat, "score": score}
        if iou_type == "segm":
            if "segmentation" not in r:
                raise DataError(f"{where}: no 'segmentation' (needed for --iou-type segm)")
            d["segmentation"] = _rle(r["segmentation"], h, w, where)
        elif "bbox" in r:
            b = r["bbox"]
            try:
                b = [float(v) for v in b]
            except (TypeError, ValueError):
                raise DataError(f"{where}: bbox {b!r} is not 4 numbers") from None
            if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[2] < 0 or b[3] < 0:
                raise DataError(f"{where}: bbox {b!r} is not [x, y, w, h] with w, h >= 0")
            d["bbox"] = b
        elif "segmentation" in r:
            d["bbox"] = [float(v) for v in mask_utils.toBbox(_rle(r["segmentation"], h, w, where))]
        else:
            raise DataError(f"{where}: needs 'bbox' or 'segmentation'")
        out.append(d)
    return out


def load_results(path) -> list:
    """A COCO results json file (list of {image_id, bbox | segmentation, score})."""
    from core.io import read_json

    res = read_json(path)
    if not isinstance(res, list):
        raise DataError(f"{path}: expected a JSON list of results, got {type(res).__name__}")
    return res


def results_from_store(store, top: int | None = None, masks: bool = False) -> list[dict]:
    """A core.store ProposalStore -> COCO results list (our image ids; bbox x,y,w,h; optional RLE masks).

    The store's order is its ranking (top N = first N); where its scores do not decrease along the ranking,
    rank-based scores 1 - r/n are used instead so COCOeval's score sort keeps the store's order."""
    if masks and not store.has_masks:
        raise DataError(f"{store.path}: this proposal store has no masks (segm recall needs them)")
    out = []
    for iid in store.image_ids:
        p = store.get(iid, top=top, masks=masks)
        s = np.asarray(p.scores, np.float64)
        if len(s) > 1 and np.any(np.diff(s) > 0):
            s = 1.0 - np.arange(len(s)) / len(s)
        b = np.asarray(p.boxes, np.float64)
        for j in range(len(s)):
            x1, y1, x2, y2 = b[j].tolist()
            d = {"image_id": str(iid), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s[j])}
            if masks:
                d["segmentation"] = p.masks[j]
            out.append(d)
    return out


# -------------------------------------------------------------------------------------------------- recall
