"""One HTML page per run: ``python -m pipelines.report --run runs/NAME`` writes ``runs/NAME/report/index.html``.

Static files that open from disk (no server, no network): Figure 5 and the recall plots with their numbers in
tables, per-class AP for each method and N, stage times, the resolved config, and a per-image viewer of the test
images: the top-k proposals of each method (a slider for k), DeepMask's masks, the detections, the ground truth
coloured by its best proposal's IoU, and a gallery of the ground-truth objects that no top-100 proposal covers at
IoU .5. Sized for thousands of test images: the page loads an index (data/index.js) and, per image shown, one small
script (data/img_<i>.js); thumbnails load lazily. ``pipelines.run`` writes it as its last stage.

Layout of ``report/``: index.html, fig/ (the run's plots), img/ (viewer images, at most ``VIEW_SIDE`` px), thumb/,
mask/ (DeepMask's top masks as one transparent PNG per image), miss/ (crops of the missed objects), data/.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np

from core.boxes import box_iou, decode_rles
from core.cli import add_set_arg, run_main
from core.config import Config, load_config
from core.errors import DataError
from core.io import read_json

log = logging.getLogger(__name__)

VIEW_SIDE = 640  # longer side of the viewer's images
THUMB_SIDE = 128
MASKS_SHOWN = 8  # DeepMask's top masks drawn on its overlay
MISS_IOU = 0.5  # the gallery: ground truth that no top-MISS_TOP proposal covers at this IoU
MISS_TOP = 100
MISS_GALLERY = 300  # crops shown at most (per method)
COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230)]


def _resized(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    s = min(1.0, side / max(image.shape[:2]))
    if s == 1.0:
        return image, 1.0
    h, w = (max(1, int(round(v * s))) for v in image.shape[:2])
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), s


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = 85) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DataError(f"{path}: could not encode the image")
    path.write_bytes(buf.tobytes())


def _crop(image: np.ndarray, box) -> np.ndarray | None:
    """A thumbnail of ``box`` (xyxy) with a 10% margin, or None for an empty box."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    pad = max(4, int(0.1 * max(x2 - x1, y2 - y1)))
    crop = image[max(0, y1 - pad):max(0, y2 + pad), max(0, x1 - pad):max(0, x2 + pad)]
    return _resized(crop, THUMB_SIDE)[0].copy() if crop.size else None


def _mask_overlay(rles: list[dict], size: tuple[int, int], path: Path) -> None:
    """The masks (COCO RLE, full image size) as one RGBA PNG of ``size`` (w, h): each mask in its colour, 45%
    opaque, the best-ranked on top."""
    w, h = size
    out = np.zeros((h, w, 4), np.uint8)
    masks = decode_rles(rles)
    for i in reversed(range(len(masks))):
        m = cv2.resize(masks[i].view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        out[m] = (*COLORS[i % len(COLORS)], 115)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(out, cv2.COLOR_RGBA2BGRA))
    path.write_bytes(buf.tobytes())


def _detections(run: Path, folder: str, n: int) -> dict[str, list]:
    """image id -> [[x1, y1, x2, y2, class name, score], ...] of results/<folder>/top<n>/detections.json."""
    f = run / "results" / folder / f"top{n}" / "detections.json"
    if not f.is_file():
        return {}
    out: dict[str, list] = {}
    for d in json.loads(f.read_text()):
        x, y, w, h = d["bbox"]
        out.setdefault(str(d["image_id"]), []).append(
            [round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1), d["category"], round(d["score"], 3)])
    return out


def _tables(run: Path, cfg: Config, summary: dict, classes: list[str]) -> dict:
    stages = []
    for f in sorted((run / "stages").glob("*.done.json")):
        d = read_json(f)
        stages.append({"stage": f.name.removesuffix(".done.json"), "seconds": d.get("seconds")})
    rows = [{k: r.get(k) for k in ("method", "N", "protocol", "train_N", "mAP", "mAP_std", "mAP_per_seed", "seeds")}
            | {"ap": {c: r["ap"].get(c) for c in classes}} for r in summary["rows"]]
    return {"name": summary.get("name", run.name), "test_images": summary.get("test_images"),
            "test_split": summary.get("test_split"), "counts": summary.get("counts"), "classes": classes,
            "rows": rows, "recall": summary.get("recall", {}), "stages": stages,
            "config": (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""}


def build_report(run, cfg: Config | None = None, max_images: int | None = None, top_k: int | None = None,
                 progress: bool = True) -> Path:
    """Write ``run/report/`` (see the module docstring) from a finished sweep; returns index.html's path."""
    from tqdm import tqdm

    from core.datasets import VOCDataset
    from core.store import ProposalStore
    from detector.test import present_classes
    from pipelines.experiment import RunPaths
    from pipelines.report_page import INDEX_HTML

    run = Path(run)
    if not (run / "sweep.json").is_file():
        raise DataError(f"{run}: no sweep.json (run `python -m pipelines.run` or `python -m pipelines.sweep` first)")
    cfg = cfg or load_config(str(run / "config.yaml"))
    max_images = cfg.report.images if max_images is None else max_images
    top_k = int(cfg.report.top_k if top_k is None else top_k)
    summary = read_json(run / "sweep.json")
    methods = [m for m in cfg.sweep.methods if (RunPaths(run).store(m, cfg.data.test_split) / "meta.json").is_file()]
    test_ds = VOCDataset(cfg.data.voc, cfg.data.test_split, max_images=cfg.data.test_images)
    classes = present_classes(test_ds)

    tmp = run / "report.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written report of an interrupted call
    for d in ("fig", "img", "thumb", "mask", "miss", "data"):
        (tmp / d).mkdir(parents=True)
    figures = []
    for name in ("figure5.png", "recall.png", "recall_iou.png"):
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / "fig" / name)
            figures.append(name)

    stores = {m: ProposalStore.open(RunPaths(run).store(m, test_ds.split)) for m in methods}
    # detections of each method's fixed-protocol detector (the run's seed) at every N of the sweep
    counts = sorted(summary.get("counts") or cfg.sweep.counts)
    dets = {m: {n: _detections(run, RunPaths(run).results(RunPaths(run).detector(m)).name, n) for n in counts}
            for m in methods}
    ids = list(test_ds.image_ids)
    if max_images:
        ids = ids[:max_images]
    index, missed = [], {m: [] for m in methods}
    for i, iid in enumerate(tqdm(ids, desc="report", unit="img", disable=not progress)):
        item, recall = _image_page(tmp, i, iid, test_ds, stores, dets, counts, top_k, missed)
        (tmp / "data" / f"img_{i}.js").write_text(f"REPORT_IMAGE({json.dumps(item, separators=(',', ':'))});\n")
        index.append({"i": i, "id": iid, "n_gt": len(item["gt"]), "recall100": recall})
    gallery = _write_gallery(tmp, missed)
    doc = {"tables": _tables(run, cfg, summary, classes), "figures": figures, "methods": methods, "images": index,
           "gallery": gallery, "top_k": top_k, "miss": {"iou": MISS_IOU, "top": MISS_TOP}, "counts": counts}
    (tmp / "data" / "index.js").write_text("REPORT = " + json.dumps(doc, separators=(",", ":")) + ";\n")
    (tmp / "index.html").write_text(INDEX_HTML)
    out = run / "report"
    if out.exists():  # derived files only: replaced whole, so no image of an older report lingers
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("report: %s (%d images)", out / "index.html", len(index))
    return out / "index.html"


def _image_page(tmp: Path, i: int, iid: str, test_ds, stores: dict, dets: dict, counts: list, top_k: int,
                missed: dict) -> tuple[dict, dict]:
    """One test image's view, thumbnail and mask overlay written under ``tmp``; returns its page data and its
    recall per method (top MISS_TOP proposals at IoU MISS_IOU); its missed objects join ``missed`` (the largest
    MISS_GALLERY kept per method)."""
    from core.images import load_image

    rec = test_ds.get(iid)
    image = load_image(rec.path)
    view, s = _resized(image, VIEW_SIDE)
    _write_jpeg(tmp / "img" / f"{i}.jpg", view)
    _write_jpeg(tmp / "thumb" / f"{i}.jpg", _resized(image, THUMB_SIDE)[0], 80)
    gt = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
    item = {"i": i, "id": iid, "w": int(image.shape[1]), "h": int(image.shape[0]), "scale": s,
            "gt": [[*np.round(b, 1).tolist(), test_ds.classes[int(c)], bool(d)]
                   for b, c, d in zip(gt, rec.labels, rec.difficult)], "proposals": {}, "dets": {}}
    recall = {}
    for m, store in stores.items():
        p = store.get(iid, top=max(top_k, MISS_TOP), masks=store.has_masks)
        boxes = np.asarray(p.boxes, np.float64)
        item["proposals"][m] = np.round(boxes[:top_k], 1).tolist()
        item["dets"][m] = {str(n): dets[m][n].get(iid, [])[:100] for n in counts if dets[m][n]}
        if p.masks:
            _mask_overlay(p.masks[:MASKS_SHOWN], (view.shape[1], view.shape[0]), tmp / "mask" / f"{i}.png")
            item["masks"] = m
        best = box_iou(gt, boxes[:MISS_TOP]).max(1, initial=0.0)
        keep = ~np.asarray(rec.difficult, bool)
        recall[m] = round(float((best[keep] >= MISS_IOU).mean()), 3) if keep.any() else None
        for j in np.flatnonzero(keep & (best < MISS_IOU)):
            crop = _crop(image, gt[j])
            if crop is not None:
                missed[m].append((float((gt[j, 2] - gt[j, 0]) * (gt[j, 3] - gt[j, 1])), i, int(j),
                                  round(float(best[j]), 3), crop, test_ds.classes[int(rec.labels[j])]))
        missed[m] = sorted(missed[m], key=lambda t: -t[0])[:MISS_GALLERY]  # the largest missed objects
    return item, recall


def _write_gallery(tmp: Path, missed: dict) -> dict:
    """The crops of the missed objects under ``tmp/miss``; {method: [their entries]}."""
    gallery = {}
    for m, items in missed.items():
        gallery[m] = []
        for k, (_, i, j, iou, crop, cls) in enumerate(items):
            _write_jpeg(tmp / "miss" / f"{m.replace(':', '_')}_{k}.jpg", crop, 80)
            gallery[m].append({"file": f"{m.replace(':', '_')}_{k}.jpg", "i": i, "gt": j, "iou": iou, "class": cls})
    return gallery


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run folder (runs/NAME) of a finished pipelines.run")
    ap.add_argument("--images", type=int, default=None, help="test images in the viewer (default report.images; "
                    "0 = all)")
    add_set_arg(ap, "the run's config, e.g. report.top_k=50")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise DataError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(str(run / "config.yaml"), args.overrides)
    print(build_report(run, cfg, max_images=args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
