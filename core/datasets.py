"""Datasets: one record type for VOCdevkit XML and COCO instances json.

Boxes in records are float32 x1, y1, x2, y2 with 0-based pixel edges. VOC XML is 1-based inclusive: a box is
read as (xmin - 1, ymin - 1, xmax, ymax) and written back with the inverse. COCO bboxes are x, y, w, h.
"""
from __future__ import annotations

import contextlib
import io
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass
class Record:
    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (N,4) float32, 0-based edges
    labels: np.ndarray  # (N,) int64, index into dataset.classes
    difficult: np.ndarray  # (N,) bool
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    segmentations: list | None = None  # COCO raw segmentation per object (polygons or RLE)
    source: int = 0  # index of the mask set it came from (DeepMask's train_sets)

    def __post_init__(self):
        if len(self.iscrowd) != len(self.boxes):
            self.iscrowd = np.zeros(len(self.boxes), bool)

    def mask_rles(self) -> list[dict]:
        """One compressed COCO RLE per object (decoded from polygons/uncompressed RLE on demand)."""
        if self.segmentations is None:
            raise DataError(f"image {self.image_id}: this dataset has no instance masks")
        from pycocotools import mask as mask_utils

        out = []
        for seg in self.segmentations:
            out.append(segmentation_to_rle(seg, self.height, self.width, self.image_id, mask_utils))
        return out

    def masks(self) -> np.ndarray:
        from .boxes import decode_rles

        rles = self.mask_rles()
        if not rles:
            return np.zeros((0, self.height, self.width), bool)
        return decode_rles(rles)


def segmentation_to_rle(seg, h: int, w: int, image_id="?", mask_utils=None) -> dict:
    if mask_utils is None:
        from pycocotools import mask as mask_utils
    if isinstance(seg, list):  # polygons
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            # empty/degenerate polygon: an empty mask (the object keeps its box)
            return mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict) and "counts" in seg:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DataError(f"image {image_id}: unrecognised segmentation {str(seg)[:60]!r}")
    return rle


# ------------------------------------------------------------------------------------------------ EXIF orientation
# Images load EXIF-oriented (core.images.load_image, as PIL/torchvision users see them). An annotation made on the
# pixels as stored on disk (VOC-era tools, COCO's json) is recognised by its <size> / width, height: it equals the
# stored W x H but not the displayed H x W (EXIF orientations 5-8 swap the sides). Such an annotation is mapped into
# the displayed image here, once, so every stage sees boxes and masks on the pixels it loads. When the size cannot
# tell (orientations 2-4 keep the size, square images, no size given) the annotation is taken to be on the displayed
# image, the loader's convention.
_EXIF_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                   7: "TRANSVERSE", 8: "ROTATE_90"}  # PIL ImageOps.exif_transpose


def orient_points(x, y, orientation: int, width: int, height: int):
    """Points (x, y) on the stored ``width`` x ``height`` pixels -> the EXIF-oriented image (continuous coords)."""
    W, H = float(width), float(height)
    return {1: (x, y), 2: (W - x, y), 3: (W - x, H - y), 4: (x, H - y), 5: (y, x), 6: (H - y, x),
            7: (H - y, W - x), 8: (y, W - x)}[int(orientation)]


def orient_boxes(boxes, orientation: int, width: int, height: int) -> np.ndarray:
    """Boxes (0-based edges) on the stored ``width`` x ``height`` pixels -> the same boxes on the oriented image."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    xa, ya = orient_points(b[:, 0], b[:, 1], orientation, width, height)
    xb, yb = orient_points(b[:, 2], b[:, 3], orientation, width, height)
    return np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)],
                    axis=1).astype(np.float32)


def orient_segmentation(seg, orientation: int, width: int, height: int, image_id="?"):
    """A COCO segmentation on the stored pixels -> the oriented image (polygons mapped, RLE masks transposed)."""
    if int(orientation) == 1:
        return seg
    if isinstance(seg, list):
        out = []
        for poly in seg:
            p = np.asarray(poly, np.float64).reshape(-1)
            if len(p) % 2 or len(p) < 6:
                out.append(list(poly))  # degenerate: stays an empty mask (segmentation_to_rle)
                continue
            x, y = orient_points(p[0::2], p[1::2], orientation, width, height)
            out.append(np.stack([x, y], 1).reshape(-1).tolist())
        return out
    from PIL import Image
    from pycocotools import mask as mask_utils

    m = mask_utils.decode(segmentation_to_rle(seg, height, width, image_id, mask_utils))
    t = np.asarray(Image.fromarray(m).transpose(getattr(Image.Transpose, _EXIF_TRANSPOSE[int(orientation)])))
    rle = mask_utils.encode(np.asfortranarray(t.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def annotation_orientation(path, ann_width: int, ann_height: int) -> int:
    """The EXIF orientation to apply to an annotation of ``ann_width`` x ``ann_height`` of image ``path``: the
    image's orientation when the annotation is on the stored pixels (its size is the stored size, and the displayed
    size differs), else 1 (already on the displayed image; see the comment above)."""
    from .images import raw_size_and_orientation

    w, h, orient = raw_size_and_orientation(path)
    if orient in (5, 6, 7, 8) and w != h and (ann_width, ann_height) == (w, h):
        return orient
    return 1


# ---------------------------------------------------------------------------------------------------- VOC
def _text(node, tag, xml_path):
    el = node.find(tag)
    if el is None or el.text is None:
        raise DataError(f"{xml_path}: missing <{tag}>")
    return el.text.strip()


def parse_voc_xml(xml_path, classes=VOC_CLASSES, image_dir=None, image_id=None) -> Record:
    xml_path = Path(xml_path)
    image_id = image_id or xml_path.stem
    if not xml_path.is_file():
        raise DataError(f"{xml_path}: annotation file not found (image id {image_id})")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{xml_path}: broken XML ({e})") from None
    image_dir = Path(image_dir) if image_dir else xml_path.parent.parent / "JPEGImages"
    fname = root.findtext("filename") or f"{image_id}.jpg"
    path = image_dir / fname.strip()
    if not path.exists() and (image_dir / f"{image_id}.jpg").exists():
        path = image_dir / f"{image_id}.jpg"
    size = root.find("size")
    try:
        width = int(float(_text(size, "width", xml_path))) if size is not None else 0
        height = int(float(_text(size, "height", xml_path))) if size is not None else 0
    except (ValueError, OverflowError):  # not a number, nan, inf
        width = height = 0
    orientation = 1
    if width <= 0 or height <= 0:  # size missing or zero in the XML: read the image header
        from .images import image_size

        width, height = image_size(path)
    else:  # annotated on the stored pixels of an EXIF-rotated photo? (see orient_boxes)
        orientation = annotation_orientation(path, width, height)
    cls_index = {c: i for i, c in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", xml_path).lower()
        if name not in cls_index:
            raise DataError(f"{xml_path}: object {k} has unknown class '{name}'")
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{xml_path}: object {k} ('{name}') has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bb, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise DataError(f"{xml_path}: object {k} ('{name}') has a non-numeric box ({e})") from None
        if not all(map(np.isfinite, (x1, y1, x2, y2))):
            raise DataError(f"{xml_path}: object {k} ('{name}') has a non-finite box coordinate")
        if x1 > x2 or y1 > y2:
            raise DataError(f"{xml_path}: object {k} ('{name}') has xmin > xmax or ymin > ymax")
        box = np.array([x1 - 1, y1 - 1, x2, y2], np.float32)  # 1-based inclusive -> 0-based edges
        clipped = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
        if not np.array_equal(clipped, box):
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:  # nothing of it inside the image: skip it
                log.warning("%s: object %d ('%s') box %s lies outside the %dx%d image, skipped", xml_path, k,
                            name, box.tolist(), width, height)
                continue
            log.warning("%s: object %d ('%s') box %s outside the %dx%d image, clipped", xml_path, k, name,
                        box.tolist(), width, height)
        boxes.append(clipped)
        labels.append(cls_index[name])
        d = (obj.findtext("difficult") or "").strip()
        try:
            difficult.append(bool(int(d)) if d else False)
        except ValueError:  # 'true' / 'false' from some tools; anything else: not difficult
            difficult.append(d.lower() == "true")
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    if orientation != 1:
        log.debug("%s: annotated on the stored pixels of an EXIF-rotated image (orientation %d); boxes rotated",
                  xml_path, orientation)
        boxes = orient_boxes(boxes, orientation, width, height)
        width, height = height, width
    return Record(
        image_id=image_id, path=str(path), width=width, height=height,
        boxes=boxes, labels=np.array(labels, np.int64), difficult=np.array(difficult, bool),
    )


def voc_box_string(box) -> tuple[float, float, float, float]:
    """0-based edges -> VOC 1-based inclusive (xmin, ymin, xmax, ymax)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1 + 1, y1 + 1, x2, y2


class VOCDataset:
    """A VOCdevkit `VOC2007` folder: JPEGImages/, Annotations/, ImageSets/Main/<split>.txt."""

    def __init__(self, voc_dir, split: str, classes=VOC_CLASSES, max_images: int = 0):
        """`max_images` > 0 keeps only the first N images of the split (CPU-sized runs)."""
        self.root = Path(voc_dir)
        self.split = split
        self.classes = tuple(classes)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: VOC folder not found (expected a VOCdevkit/VOC2007 folder)")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"{split_file}: split file not found (split '{split}')")
        ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
        if not ids:
            raise DataError(f"{split_file}: split '{split}' lists no images")
        if max_images and max_images > 0:
            ids = ids[:max_images]
        self.image_ids = ids
        self._index = {i: k for k, i in enumerate(ids)}
        self._cache: dict[str, Record] = {}
        self.name = f"voc:{self.root.resolve()}"

    def __len__(self):
        return len(self.image_ids)

    def get(self, image_id: str) -> Record:
        rec = self._cache.get(image_id)
        if rec is None:
            if image_id not in self._index:
                raise DataError(f"image id '{image_id}' is not in split '{self.split}' of {self.root}")
            rec = parse_voc_xml(self.root / "Annotations" / f"{image_id}.xml", self.classes,
                                self.root / "JPEGImages", image_id)
            self._cache[image_id] = rec
        return rec

    def __getitem__(self, i: int) -> Record:
        return self.get(self.image_ids[i])

    def __iter__(self):
        for i in self.image_ids:
            yield self.get(i)


# ---------------------------------------------------------------------------------------------------- COCO
def load_coco(ann_file):
    """pycocotools COCO object without its stdout chatter; DataError naming the file on failure."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: COCO annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except Exception as e:
        raise DataError(f"{ann_file}: cannot read COCO annotations ({type(e).__name__}: {e})") from None
    for key in ("images", "categories"):
        if key not in coco.dataset:
            raise DataError(f"{ann_file}: missing '{key}'")
    return coco


class CocoDataset:
    """COCO instances json via pycocotools. Masks are decoded lazily (Record.mask_rles / Record.masks)."""

    def __init__(self, ann_file, image_dir, categories: list[str] | None = None):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.coco = load_coco(ann_file)
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if categories:
            names = {c["name"] for c in cats}
            missing = [n for n in categories if n not in names]
            if missing:
                raise DataError(f"{ann_file}: categories not in the dataset: {missing}")
            cats = [c for c in cats if c["name"] in set(categories)]
        self.cat_ids = [c["id"] for c in cats]
        self.classes = tuple(c["name"] for c in cats)
        self._cat_index = {cid: k for k, cid in enumerate(self.cat_ids)}
        self.image_ids = [str(i) for i in sorted(self.coco.getImgIds())]
        self._index = {i: k for k, i in enumerate(self.image_ids)}
        self.split = self.ann_file.stem
        self.name = f"coco:{self.ann_file.resolve()}"

    def __len__(self):
        return len(self.image_ids)

    def get(self, image_id) -> Record:
        image_id = str(image_id)
        if image_id not in self._index:
            raise DataError(f"image id '{image_id}' is not in {self.ann_file}")
        img = self.coco.imgs[int(image_id)]
        w, h = int(img.get("width", 0)), int(img.get("height", 0))
        if "file_name" not in img:
            raise DataError(f"{self.ann_file}: image {image_id} has no file_name")
        path = self.image_dir / img["file_name"]
        if w <= 0 or h <= 0:
            from .images import image_size

            w, h = image_size(path)
        boxes, labels, crowd, segs = [], [], [], []
        for a in self.coco.imgToAnns.get(int(image_id), []):
            if a.get("category_id") not in self._cat_index:
                continue
            bbox = a.get("bbox")
            if bbox is None or len(bbox) != 4:
                raise DataError(f"{self.ann_file}: annotation {a.get('id')} of image {image_id} has no valid bbox")
            x, y, bw, bh = (float(v) for v in bbox)
            if bw <= 0 or bh <= 0:
                continue  # degenerate box: nothing to detect or segment
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self._cat_index[a["category_id"]])
            crowd.append(bool(a.get("iscrowd", 0)))
            segs.append(a.get("segmentation", []))
        boxes = np.array(boxes, np.float32).reshape(-1, 4)
        crowd = np.array(crowd, bool)
        orientation = annotation_orientation(path, w, h)  # annotated on the stored pixels of a rotated photo?
        if orientation != 1:
            boxes = orient_boxes(boxes, orientation, w, h)
            segs = [orient_segmentation(s, orientation, w, h, image_id) for s in segs]
            w, h = h, w
        return Record(
            image_id=image_id, path=str(path), width=w, height=h, boxes=boxes,
            labels=np.array(labels, np.int64), difficult=crowd.copy(), iscrowd=crowd, segmentations=segs,
        )

    def __getitem__(self, i: int) -> Record:
        return self.get(self.image_ids[i])

    def __iter__(self):
        for i in self.image_ids:
            yield self.get(i)


def open_dataset(voc=None, split=None, coco=None, images=None, categories=None):
    if voc:
        if not split:
            raise DataError("--voc needs --split")
        return VOCDataset(voc, split)
    if coco:
        if not images:
            raise DataError(f"--coco {coco} needs --images DIR")
        return CocoDataset(coco, images, categories)
    raise DataError("no dataset given: pass --voc DIR/VOC2007 --split SPLIT, or --coco ANN.json --images DIR")
