"""Evaluate detections (VOC07 mAP) or proposals (COCO-style AR, as DeepMask's official evaluation).

    python -m pipelines.evaluate detections --voc DIR/VOC2007 --split test --results RESDIR
        RESDIR holds the devkit result files comp4_det_<split>_<class>.txt (detector/voc_eval.py)
    python -m pipelines.evaluate proposals (--coco ANN.json | --voc DIR/VOC2007 --split SPLIT)
        --proposals RES.json|STORE_DIR [--proposals ...] [--iou-type bbox|segm] [--plot PNG]
        RES.json: COCO results list [{image_id, bbox [x,y,w,h] | segmentation (RLE), score}];
        STORE_DIR: a proposal store (core/store.py; an imported one too, pipelines.import_proposals)
        --plot: the localisation plots, one curve per --proposals (recall vs IoU threshold at 10 / 100 / 1000
        proposals, recall at IoU .5 and .7 and AR vs the number of proposals: paper Fig. 4 g-i, Hosang et al.)

A human-readable table is printed first; the LAST line of stdout is one JSON object. Bad input (missing folder or
file, broken XML, unknown class, malformed results) -> one line 'error: ...' on stderr and exit code 2. With several
--proposals the JSON object is {"methods": {name: result}} (name: the store's method, or the json's file name).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from core.cli import counts as counts_arg, run_main
from core.errors import DataError
from core.io import write_json

log = logging.getLogger("pipelines.evaluate")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("detections", help="VOC2007 11-point mAP of devkit result files")
    d.add_argument("--voc", required=True, help="VOCdevkit VOC2007 folder (Annotations/, ImageSets/Main/)")
    d.add_argument("--split", required=True, help="image set, e.g. test or val")
    d.add_argument("--results", required=True, help="folder with comp4_det_<split>_<class>.txt")
    d.add_argument("--out", help="also write the JSON result to this file")

    p = sub.add_parser("proposals", help="average recall (AR@10/100/1000, AUC, S/M/L) of proposals")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--coco", help="COCO instances json (ground truth)")
    g.add_argument("--voc", help="VOCdevkit VOC2007 folder (ground truth; needs --split; boxes only)")
    p.add_argument("--split", help="image set with --voc")
    p.add_argument("--proposals", required=True, action="append",
                   help="COCO results json, or a proposal store folder (repeat to compare methods)")
    p.add_argument("--max-images", type=int, default=0, metavar="N",
                   help="with --voc: only the first N images of the split are the ground truth (as propose's "
                        "--max-images); proposals of other images are left out")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--counts", type=counts_arg("--counts"), default=[10, 100, 1000],
                   help="proposal counts for AR@n (comma separated; default 10,100,1000)")
    p.add_argument("--no-sizes", action="store_true",
                   help="skip the small/medium/large ranges (about 4x faster; no AR_S/M/L keys)")
    p.add_argument("--plot", metavar="PNG", help="also write the localisation plots (recall vs IoU, recall at IoU "
                   ".5 / .7 and AR vs number of proposals) to this PNG")
    p.add_argument("--out", help="also write the JSON result to this file")
    return ap


def _detections(args) -> dict:
    from core.datasets import VOCDataset
    from detector.voc_eval import evaluate_detections, format_table
    from detector.voc_results import read_results

    ds = VOCDataset(args.voc, args.split)
    records = [ds[i] for i in range(len(ds))]  # parses every XML: errors name the file
    dets = read_results(args.results, args.split, ds.classes, image_ids=ds.image_ids)
    res = evaluate_detections(records, dets, classes=ds.classes)
    print(f"VOC07 11-point AP, {len(records)} images of {ds.root} split '{args.split}', results {args.results}")
    print(format_table(res))
    return res


def _proposals(args) -> dict:
    from proposals.recall import evaluate_proposals, gt_from_coco, gt_from_records, load_results, \
        nan_to_none, results_from_store

    counts = args.counts
    ds = None
    if args.max_images < 0 or (args.max_images and args.coco):
        raise DataError("--max-images takes N >= 1 and needs --voc")
    if args.coco:
        gt = gt_from_coco(args.coco)
    else:
        from core.datasets import VOCDataset

        if not args.split:
            raise DataError("--voc needs --split")
        ds = VOCDataset(args.voc, args.split)
        n = len(ds) if args.max_images <= 0 else min(len(ds), args.max_images)
        gt = gt_from_records((ds[i] for i in range(n)), ds.classes, name=f"{ds.root} split '{args.split}'")

    areas = ("all",) if args.no_sizes else ("all", "small", "medium", "large")
    out, loc = {}, {}
    for src in map(Path, args.proposals):
        name = src.stem
        if src.is_dir():
            from core.store import ProposalStore

            store = ProposalStore.open(src)
            if ds is not None:
                store.check(ds.name, args.split)
            results = results_from_store(store, top=counts[-1], masks=args.iou_type == "segm")
            name = store.method
        else:
            results = load_results(src)
        if args.max_images:  # the images beyond the first N are not in the ground truth
            results = [r for r in results if isinstance(r, dict) and _in_gt(gt, r.get("image_id"))]
        while name in out:  # two sources of the same method
            name += "'"
        if args.plot:  # one evaluation with IoU 1 added serves both (AR averages over .50:.95 only)
            from proposals.recall import LOC_IOU_THRESHOLDS, ProposalRecall, auc_grid, localization_curves

            pr = ProposalRecall(gt, results, args.iou_type, max_count=counts[-1], source=str(src), areas=areas,
                                iou_thresholds=LOC_IOU_THRESHOLDS)
            res = pr.summary(counts, auc_grid(counts[-1]))
            loc[name] = localization_curves(pr)
        else:
            res = evaluate_proposals(gt, results, args.iou_type, counts=counts, source=str(src), areas=areas)
        print(f"proposal recall ({args.iou_type}, useCats=0, IoU .50:.05:.95), {res['n_images']} images, "
              f"{res['n_objects']} objects, {res['n_proposals']} proposals from {src}")
        for k, v in res.items():
            if isinstance(v, float):
                print(f"  {k:<10s} {v:.4f}")
        print(f"  AUC grid (log-spaced counts): {res['auc_counts']}")
        out[name] = nan_to_none(res)
    if args.plot:
        from pipelines.plots import plot_localization

        plot_localization(loc, args.plot, title=f"{args.iou_type} proposal localisation "
                          f"({'COCO ' + Path(args.coco).name if args.coco else 'split ' + args.split})")
        print(f"wrote {args.plot}")
    return next(iter(out.values())) if len(out) == 1 else {"methods": out}


def _in_gt(gt, image_id) -> bool:
    try:
        gt.coco_id(image_id)
    except DataError:
        return False
    return True


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    res = _detections(args) if args.cmd == "detections" else _proposals(args)
    if args.out:
        write_json(args.out, res, indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    run_main(main)
