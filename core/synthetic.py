"""Built-in synthetic detection dataset ("shapes"): a real VOCdevkit layout plus COCO instance masks.

It is the embedded default for the main job and the data of the end-to-end tests: a fresh machine has no
VOC or COCO, so the whole pipeline (DeepMask trained on instance masks, SelectiveSearch, Fast R-CNN, the
Figure 5 sweep) runs on this set in minutes on a CPU.

Layout written under ``out``::

    out/VOC2007/JPEGImages/<id>.jpg
    out/VOC2007/Annotations/<id>.xml                  VOC XML, boxes 1-based inclusive
    out/VOC2007/ImageSets/Main/{trainval,train,val,test}.txt
    out/annotations/instances_{trainval,test}.json     COCO instances, compressed RLE masks (counts as str)
    out/synthetic.json                                 manifest: generator parameters, complete flag

What an image holds (shapes, clutter, occlusion, the annotation rules): core/shapes.py.

Determinism: image ``i`` draws from ``np.random.default_rng([seed, i])``, independent of the worker that renders
it, and every file is written with a fixed format (JSON with sorted keys, no floats other than integral ones), so
two runs with one seed give byte-identical files, with any number of workers.

Defaults: 240 trainval (first 80% = ``train``, the rest = ``val``) + 80 test images, longest side 256 px (the
other side 192-256 px, either orientation). Generating them takes a few seconds on one core.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from tqdm import tqdm

from .boxes import encode_masks
from .datasets import VOC_CLASSES
from .errors import UserError
from .io import atomic_write_bytes, atomic_write_text
from .shapes import SHAPE_CLASSES, render

logger = logging.getLogger(__name__)


FORMAT_VERSION = 1
MANIFEST = "synthetic.json"
JPEG_QUALITY = 90
TRAIN_FRACTION = 0.8

_ID_RE = re.compile(r"^\d{6}\.(jpg|xml)$")


# ----------------------------------------------------------------------------------------------- files

def _voc_xml(image_id: str, width: int, height: int, objects) -> str:
    parts = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>Synthetic shapes (pipelines.make_shapes)</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        # VOC is 1-based inclusive: 0-based edges (x1, y1, x2, y2) -> (x1+1, y1+1, x2, y2)
        parts += [
            "\t<object>",
            f"\t\t<name>{escape(SHAPE_CLASSES[o['label']])}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(o['truncated'])}</truncated>",
            f"\t\t<difficult>{int(o['difficult'])}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1 + 1}</xmin>",
            f"\t\t\t<ymin>{y1 + 1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _jpeg_bytes(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def _make_one(job):
    """Render image `index`, write its JPEG and XML; return its COCO image entry and annotations (no ids)."""
    out, seed, index, image_id, size = job
    img, objects = render(seed, index, size)
    h, w = img.shape[:2]
    voc = Path(out) / "VOC2007"
    atomic_write_bytes(voc / "JPEGImages" / f"{image_id}.jpg", _jpeg_bytes(img))
    atomic_write_text(voc / "Annotations" / f"{image_id}.xml", _voc_xml(image_id, w, h, objects))
    rles = encode_masks(np.stack([o["mask"] for o in objects]))
    anns = []
    for o, rle in zip(objects, rles):
        x1, y1, x2, y2 = o["box"]
        anns.append({
            "image_id": int(image_id),
            "category_id": VOC_CLASSES.index(SHAPE_CLASSES[o["label"]]) + 1,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
            "area": float(o["area"]),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "iscrowd": 0,
        })
    return {"id": int(image_id), "file_name": f"{image_id}.jpg", "width": w, "height": h}, anns


def _coco_json(images, anns_per_image, split: str) -> str:
    annotations = []
    for anns in anns_per_image:
        for a in anns:
            annotations.append(dict(a, id=len(annotations) + 1))
    obj = {
        "info": {"description": f"synthetic shapes ({split}), made by pipelines.make_shapes",
                 "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)],
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def _manifest(params: dict, complete: bool) -> str:
    obj = {"generator": "pipelines.make_shapes", "format_version": FORMAT_VERSION, "params": params,
           "classes": list(SHAPE_CLASSES), "complete": complete}
    return json.dumps(obj, sort_keys=True, indent=1) + "\n"


def _check_args(trainval, test, size, seed, workers):
    for name, val, lo in (("trainval", trainval, 2), ("test", test, 1), ("size", size, 64), ("workers", workers, 0)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise UserError(f"synthetic: {name} must be an integer >= {lo}, got {val!r}")
    if size > 4096:
        raise UserError(f"synthetic: size must be <= 4096, got {size}")
    if trainval + test > 999_999:
        raise UserError(f"synthetic: at most 999999 images (6-digit ids), got {trainval + test}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"synthetic: seed must be a non-negative integer, got {seed!r}")


def _prepare_out(out: Path, params: dict) -> bool:
    """Check `out` is writable and ours; return True when it already holds this exact, complete set."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    man = out / MANIFEST
    if man.is_file():
        try:
            old = json.loads(man.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("complete") and old.get("params") == params and old.get("format_version") == FORMAT_VERSION:
            return True
    elif any((out / d).exists() for d in ("VOC2007", "annotations")):
        # Never overwrite a dataset this generator did not make (e.g. a real VOCdevkit).
        raise UserError(f"{out}: holds a VOC2007/ or annotations/ folder not made by make_shapes "
                        f"(no {MANIFEST}); choose an empty --out")
    try:
        for d in ("VOC2007/JPEGImages", "VOC2007/Annotations", "VOC2007/ImageSets/Main", "annotations"):
            (out / d).mkdir(parents=True, exist_ok=True)
        probe = out / f".{MANIFEST}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: cannot write the synthetic dataset there ({e.strerror or e})") from None
    return False


def generate(out, trainval: int = 240, test: int = 80, size: int = 256, seed: int = 0, workers: int = 1,
             force: bool = False, progress: bool = True) -> None:
    """Write the synthetic set into `out` (see the module docstring).

    Image ids: trainval are '000001'..N, test follow. Skips the work when `out` already holds a complete set made
    with the same parameters (unless `force`). `workers` > 1 renders in that many processes (0 = one per CPU);
    the files do not depend on it. Raises UserError for bad arguments or an unwritable / foreign `out`.
    """
    _check_args(trainval, test, size, seed, workers)
    out = Path(out)
    params = {"trainval": int(trainval), "test": int(test), "size": int(size), "seed": int(seed)}
    if _prepare_out(out, params) and not force:
        logger.info("synthetic set in %s is complete for %s; skipping", out, params)
        return
    atomic_write_text(out / MANIFEST, _manifest(params, complete=False))
    n = trainval + test
    ids = [f"{i + 1:06d}" for i in range(n)]
    voc = out / "VOC2007"
    # Remove files of an earlier (different) generation in this folder that the new one does not overwrite.
    keep = set(ids)
    for d in ("JPEGImages", "Annotations"):
        for p in (voc / d).iterdir():
            if _ID_RE.match(p.name) and p.stem not in keep:
                p.unlink()
    jobs = [(str(out), int(seed), i, ids[i], int(size)) for i in range(n)]
    workers = (os.cpu_count() or 1) if workers == 0 else workers
    workers = min(workers, n)
    logger.info("writing %d synthetic images (%d trainval, %d test, size %d, seed %d) to %s with %d worker(s)",
                n, trainval, test, size, seed, out, workers)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(tqdm(ex.map(_make_one, jobs, chunksize=max(1, n // (8 * workers))), total=n,
                                disable=not progress,
                                desc="shapes", unit="img"))
    else:
        results = [_make_one(j) for j in tqdm(jobs, desc="shapes", unit="img", disable=not progress)]
    images = [r[0] for r in results]
    anns = [r[1] for r in results]
    n_train = min(trainval - 1, int(math.ceil(TRAIN_FRACTION * trainval)))  # val never empty
    main = voc / "ImageSets" / "Main"
    splits = {"trainval": ids[:trainval], "train": ids[:n_train], "val": ids[n_train:trainval], "test": ids[trainval:]}
    for name, split_ids in splits.items():
        atomic_write_text(main / f"{name}.txt", "".join(f"{i}\n" for i in split_ids))
    atomic_write_text(out / "annotations" / "instances_trainval.json",
                      _coco_json(images[:trainval], anns[:trainval], "trainval"))
    atomic_write_text(out / "annotations" / "instances_test.json",
                      _coco_json(images[trainval:], anns[trainval:], "test"))
    atomic_write_text(out / MANIFEST, _manifest(params, complete=True))
    n_obj = sum(len(a) for a in anns)
    logger.info("synthetic set done: %d images, %d objects in %s", n, n_obj, out)
