"""Import precomputed proposals of your own method into a proposal store (and check them), or export a store.

    python -m pipelines.import_proposals FILE --voc DIR/VOC2007 --split S --out STORE [--name NAME]
        [--format auto|coco|rcnn_mat|hosang_mat|detectron2|mmdet|npz] [--check-only]
        [--layout xyxy|xywh|yxyx] [--base edges0|pixels1|edges1|pixels0] [--resized SHORT[,MAX]]
        [--rank-by score|order] [--allow-missing] [--force] [--trust-pickle] [--overwrite]
    python -m pipelines.import_proposals FILE --coco ANN.json --images DIR ...     (a COCO dataset instead of --voc)
    python -m pipelines.import_proposals --export STORE FILE --format FORMAT [--top N]

FILE: a COCO results json, an R-CNN `selective_search_data` .mat, a Hosang et al. benchmark .mat (or a folder of
per-image .mat files), a detectron2 or mmdetection proposal pickle, or an .npz (proposals/formats.py says what each
is assumed to hold). The checker (proposals/check.py) runs on every import: it names the coordinate system (0/1-based,
xyxy/xywh/yxyx, original or resized image), boxes outside the image, degenerate and duplicate boxes, unsorted or
missing scores and image ids that do not match the split, with the option that fixes each; a clearly wrong file is
refused (exit 2) unless --force. The store's method is `imported:NAME` (default: the file's name); train and test a
detector on it with pipelines.train_detector / test_detector / sweep, score it with `pipelines.evaluate proposals`.

A report is printed first; the LAST line of stdout is one JSON object with `diagnosis` (the codes found, empty for
a clean file), `refused`, `findings`, `suggested_args` and `store`. Bad input -> one line 'error: ...' on stderr and
exit code 2 (after the JSON line when the checker refused the file).
"""
from __future__ import annotations

import argparse
import json
import logging

from core.cli import run_main
from core.errors import DataError

log = logging.getLogger("pipelines.import_proposals")


def _parser() -> argparse.ArgumentParser:
    from proposals.formats import BASES, FORMATS, LAYOUTS

    p = argparse.ArgumentParser(prog="python -m pipelines.import_proposals", description=__doc__.split("\n")[0])
    p.add_argument("file", metavar="FILE", help="proposal file (or folder, hosang_mat) to import; with --export, "
                   "the file to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--voc", help="VOCdevkit VOC2007 folder (with --split)")
    src.add_argument("--coco", help="COCO instances json (with --images)")
    src.add_argument("--export", metavar="STORE", help="write this proposal store to FILE in --format")
    p.add_argument("--split", help="VOC split (ImageSets/Main/<split>.txt)")
    p.add_argument("--images", help="image folder of --coco")
    p.add_argument("--out", help="proposal store folder to write")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="file format (default: from the "
                   "file name and content)")
    p.add_argument("--name", help="method name: the store's method is imported:NAME (default: the file's name)")
    p.add_argument("--check-only", action="store_true", help="check the file, write nothing")
    p.add_argument("--layout", choices=LAYOUTS, help="box columns of the file (default: the format's)")
    p.add_argument("--base", choices=BASES, help="coordinate convention of the file (default: the format's): "
                   "edges0 0-based pixel edges (COCO, detectron2, this project), pixels1 1-based pixel indices "
                   "(Matlab, VOC), edges1 every coordinate one too large, pixels0 0-based pixel indices")
    p.add_argument("--resized", metavar="SHORT[,MAX]", help="the boxes are coordinates of the image resized to "
                   "shorter side SHORT (longer side at most MAX), e.g. 600,1000")
    p.add_argument("--rank-by", choices=("score", "order"), default="score",
                   help="rank each image's proposals by score (default) or keep the file's order")
    p.add_argument("--allow-missing", action="store_true", help="store split images absent from the file with no "
                   "proposals (instead of refusing)")
    p.add_argument("--force", action="store_true", help="import even when the checker refuses the file")
    p.add_argument("--trust-pickle", action="store_true", help="load pickles with Python's full pickle (runs code "
                   "from the file: only for files you made); default: a loader of numpy arrays and containers only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store of another import at --out")
    p.add_argument("--top", type=int, help="--export: at most N proposals per image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_report(result_info: dict, report) -> None:
    st = report.stats
    print(f"{result_info['file']}: format {result_info['format']} (read as layout {result_info['layout']}, base "
          f"{result_info['base']}" + (f", resized {result_info['resized']}" if result_info.get("resized") else "")
          + f"); {st.get('n_images', 0)} images of split '{result_info['split']}' with {st.get('n_boxes', 0)} boxes "
          f"({st.get('n_file_images', 0)} images in the file)")
    for f in report.findings:
        tag = "REFUSED" if f.severity == "refuse" else "warning"
        print(f"  {tag:<8} {f.code:<15} {f.message}")
        if f.fix:
            print(f"  {'':<8} {'':<15} fix: {f.fix}")
    for n in report.notes:
        print(f"  note: {n}")
    if not report.findings:
        print("  clean: no problem found")
    if report.suggested_args():
        print(f"  the file reads correctly with: {' '.join(report.suggested_args())}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.export:
        from proposals.importing import export_store

        if args.format == "auto":
            raise DataError("--export needs --format (coco, rcnn_mat, hosang_mat, detectron2, mmdet or npz)")
        n = export_store(args.export, args.file, args.format, top=args.top)
        print(json.dumps({"exported": args.export, "file": args.file, "format": args.format, "boxes": n}))
        return 0

    from core.datasets import open_dataset
    from proposals.importing import ImportRefused, import_proposals

    if not args.voc and not args.coco:
        raise DataError("no dataset: give --voc DIR/VOC2007 --split S, or --coco ANN.json --images DIR")
    if not args.check_only and not args.out:
        raise DataError("--out STORE is needed (or --check-only)")
    dataset = open_dataset(voc=args.voc, split=args.split, coco=args.coco, images=args.images)
    kw = dict(fmt=args.format, name=args.name, layout=args.layout, base=args.base, resized=args.resized,
              rank_by=args.rank_by, allow_missing=args.allow_missing, force=args.force, check_only=args.check_only,
              trust_pickle=args.trust_pickle, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        res = import_proposals(args.file, dataset, args.out, **kw)
    except ImportRefused as e:
        _print_report(e.info, e.report)
        print(json.dumps({**e.info, **e.report.as_dict(), "store": None}))
        raise
    _print_report(res.info, res.report)
    if res.store:
        i = res.info
        if i.get("skipped"):
            print(f"{res.store}: already holds this import (nothing written)")
        else:
            print(f"imported {i['boxes_stored']} boxes of {res.report.stats.get('n_images', 0)} images into "
                  f"{res.store} as '{i['method']}' ({i['boxes_clipped']} clipped to the image, {i['boxes_dropped']} "
                  "without area dropped)")
    print(json.dumps({**res.info, **res.report.as_dict(), "store": res.store}))
    if args.check_only and res.report.refused and not args.force:
        raise DataError(f"{args.file}: the checker refuses this file ({', '.join(res.report.refused)})")
    return 0


if __name__ == "__main__":
    run_main(main)
