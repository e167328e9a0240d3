"""Run the trained detector on your own images.

    python -m pipelines.detect --run runs/<name> IMAGE_OR_FOLDER [...] --out DIR
        [--method deepmask|selective_search] [--top N] [--score-thresh T] [--show-masks]
    python -m pipelines.detect --detector-checkpoint CKPT [--proposer-checkpoint CKPT] IMAGE ... --out DIR

For each image: DIR/<stem>.png with boxes, class names and scores drawn (and, with --show-masks, the DeepMask masks
behind the kept detections) and DIR/<stem>.json with the detections in original image pixels (0-based x1,y1,x2,y2).
Any JPEG or PNG of any size: images whose longer side exceeds --max-side (default 1000, Fast R-CNN's MAX_SIZE) are
processed at that size and the results mapped back. A bad image gets one error line and the others still run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from core.cli import add_set_arg, run_main
from core.config import load_config
from core.errors import CheckpointError, DataError, ImageError, UserError, is_out_of_memory
from core.images import IMAGE_EXT, image_files
from core.io import atomic_write_bytes, write_json
from core.precision import resolve_dtype

log = logging.getLogger("pipelines.detect")

MIN_SIDE = 16  # one feature cell of a stride-16 trunk
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]


def list_images(items: list[str]) -> list[Path]:
    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise DataError(f"{p}: folder has no images ({', '.join(sorted(IMAGE_EXT))})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such image or folder")
    return out


def resolve_models(args):
    """(cfg, detector checkpoint, proposer method, proposer checkpoint) from --run or explicit checkpoints."""
    from detector.model import DetectorCheckpoint

    if args.run:
        from pipelines.experiment import RunPaths

        run = RunPaths(Path(args.run))
        if not (run.root / "config.yaml").is_file():
            raise DataError(f"{run.root}: not a run folder (no config.yaml)")
        cfg = load_config(str(run.root / "config.yaml"), args.overrides)
        method = args.method or ("deepmask" if (run.detector("deepmask") / "final.pt").is_file()
                                 else "selective_search")
        det = Path(args.detector_checkpoint or run.detector(method) / "final.pt")
        prop = args.proposer_checkpoint or (str(run.deepmask / "best.pt") if method == "deepmask" else None)
    else:
        if not args.detector_checkpoint:
            raise UserError("give --run runs/<name>, or --detector-checkpoint CKPT (and --proposer-checkpoint "
                            "for DeepMask proposals)")
        det = Path(args.detector_checkpoint)
        cfg = None
        method = args.method or ("deepmask" if args.proposer_checkpoint else "selective_search")
        prop = args.proposer_checkpoint
    if method == "deepmask" and not prop:
        raise UserError("--method deepmask needs a DeepMask checkpoint (--proposer-checkpoint or a run folder)")
    if not det.is_file():
        raise CheckpointError(f"{det}: detector checkpoint not found (train it with pipelines.run or "
                              "pipelines.train_detector)")
    ckpt = DetectorCheckpoint.read(det)
    return cfg or ckpt.config(args.overrides), ckpt, method, prop


def draw(image: np.ndarray, det: dict, classes, masks: np.ndarray | None = None) -> bytes:
    """PNG bytes of the image with masks (optional), boxes, class names and scores."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    canvas = image.astype(np.float32)
    if masks is not None:
        for m, lab in zip(masks, det["labels"]):
            colour = np.array(PALETTE[int(lab) % len(PALETTE)], np.float32)
            canvas[m] = 0.5 * canvas[m] + 0.5 * colour
    im = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 400))
    try:
        font = ImageFont.load_default(size=max(11, round(max(im.size) / 60)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for b, s, lab in zip(det["boxes"], det["scores"], det["labels"]):
        colour = PALETTE[int(lab) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in b)
        d.rectangle([x1, y1, x2, y2], outline=colour, width=lw)
        text = f"{classes[int(lab)]} {s:.2f}"
        tb = d.textbbox((x1, y1), text, font=font)
        ty = y1 - (tb[3] - tb[1]) - 2 if y1 - (tb[3] - tb[1]) - 2 >= 0 else y1
        tb = d.textbbox((x1, ty), text, font=font)
        d.rectangle([tb[0] - 1, tb[1] - 1, tb[2] + 1, tb[3] + 1], fill=colour)
        d.text((x1, ty), text, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def detect_file(path: Path, proposer, model, classes, dcfg, top: int, max_side: int, show_masks: bool) -> tuple:
    import cv2

    from core.boxes import clip_boxes, decode_rles
    from core.images import load_image
    from detector.predict import predict

    image = load_image(path)
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{path}: image is {w}x{h} px, too small to detect objects in (at least {MIN_SIDE} px "
                         "per side)")
    f = min(1.0, max_side / max(h, w)) if max_side > 0 else 1.0
    work = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) \
        if f < 1 else image
    boxes, scores, rles = proposer(work)
    boxes, rles = boxes[:top], (rles[:top] if rles is not None else None)
    det = predict(model, work, boxes, dcfg)
    masks = None
    if show_masks and rles is not None and len(det["proposal"]):
        masks = decode_rles([rles[i] for i in det["proposal"]])
        if f < 1:
            masks = np.stack([cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
                              for m in masks])
    if f < 1:
        det["boxes"] = clip_boxes(det["boxes"] / f, h, w)
    return image, det, masks, len(boxes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.detect", description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--run", help="run folder (runs/<name>) with trained models")
    ap.add_argument("--out", required=True, help="output folder for <stem>.png and <stem>.json")
    ap.add_argument("--method", choices=["deepmask", "selective_search"], help="proposals (default: deepmask "
                    "when the run has it)")
    ap.add_argument("--top", type=int, default=None, help="proposals per image (default 100 DeepMask, 2000 SS)")
    ap.add_argument("--score-thresh", type=float, default=0.5, help="minimum detection score to keep (0.5)")
    ap.add_argument("--show-masks", action="store_true", help="draw the DeepMask masks behind the detections")
    ap.add_argument("--max-side", type=int, default=1000, help="longer side cap in pixels (0 = none)")
    ap.add_argument("--proposer-checkpoint", help="DeepMask checkpoint (instead of --run)")
    ap.add_argument("--detector-checkpoint", help="Fast R-CNN checkpoint (instead of --run)")
    add_set_arg(ap, "the run's (or the detector checkpoint's) config, e.g. deepmask.mask_threshold=0.1")
    args = ap.parse_args(argv)
    if args.top is not None and args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if not 0 <= args.score_thresh <= 1:
        raise UserError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    images = list_images(args.images)
    cfg, det_ckpt, method, prop_ckpt = resolve_models(args)
    top = args.top or (100 if method == "deepmask" else 2000)
    import dataclasses

    from proposals import build_proposer

    dcfg = dataclasses.replace(cfg.detector, score_thresh=args.score_thresh)
    model, classes = det_ckpt.build(cfg.device), det_ckpt.classes
    model = model.for_inference(resolve_dtype(dcfg.test_dtype, cfg.device, "detector.test_dtype", int8=True)[0])
    proposer = build_proposer(method, cfg, prop_ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    from tqdm import tqdm

    for path in tqdm(images, desc="detect", unit="img", disable=len(images) < 2 or not sys.stderr.isatty()):
        try:
            image, det, masks, n_props = detect_file(path, proposer, model, classes, dcfg, top, args.max_side,
                                                     args.show_masks)
        except UserError as e:
            tqdm.write(f"error: {e}", file=sys.stderr)  # on its own line, above the progress bar
            failed += 1
            continue
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            tqdm.write(f"error: {path}: out of memory ({type(e).__name__}); lower --max-side (now {args.max_side}) "
                       f"or --top (now {top})", file=sys.stderr)
            failed += 1
            continue
        h, w = image.shape[:2]
        record = {"image": str(path), "width": w, "height": h, "method": method, "proposals": n_props,
                  "score_thresh": args.score_thresh,
                  "detections": [{"class": classes[int(l)], "score": round(float(s), 4),
                                  "box": [round(float(v), 1) for v in b]}
                                 for b, s, l in zip(det["boxes"], det["scores"], det["labels"])]}
        write_json(out / f"{path.stem}.json", record, indent=1)
        atomic_write_bytes(out / f"{path.stem}.png", draw(image, det, classes, masks))
        log.info("%s: %d detections (%d %s proposals) -> %s", path.name, len(det["boxes"]), n_props, method,
                 out / f"{path.stem}.png")
    if failed:
        print(f"error: {failed} of {len(images)} images failed (see above); the others are in {out}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
