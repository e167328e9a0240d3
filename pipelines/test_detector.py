"""Test a trained Fast R-CNN: detections for every image with the top N proposals, VOC07 mAP, devkit files.

    python -m pipelines.test_detector --checkpoint CKPT --proposals STORE --top 10,100,500,2000 \
        [--voc DIR] [--split SPLIT] --out RESDIR [--set detector.svd=true ...]

One pass over the images serves every N of --top (trunk once per image, RoI head once on the largest N).
Writes RESDIR/top<N>/comp4_det_<split>_<class>.txt, detections.json (COCO-style), metrics.json, and
RESDIR/results.json. --set overrides the checkpoint's config (test fields: detector.test_scale, max_size,
score_thresh, test_nms, max_dets, svd, svd_fc6_rank, svd_fc7_rank, workers; device).

Sharded: `--shard I/N` (independent jobs, same arguments) detects images I, I+N, ... and writes
RESDIR/shards/detections-I-of-N.json only (last line: {"shard": path, "images": count}); then `--merge` (same
arguments, no --shard) merges RESDIR/shards/detections-*-of-N.json per image and evaluates: the files and numbers of
one process. Under `torchrun --nproc_per_node=G -m pipelines.test_detector ...` the ranks are the shards and rank 0
merges and evaluates by itself.

The last line of stdout is one JSON object:
    {"mAP": {"<N>": float, ...}, "mAP_all": {"<N>": float, ...}, "ap": {"<N>": {"<class>": float}}, "out": RESDIR}
"mAP" averages AP over the classes with ground truth in the split; "mAP_all" over all classes of the dataset.
"""
from __future__ import annotations

import argparse
import json

from core.cli import add_set_arg, add_shard_arg, counts, run_main
from core.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.test_detector", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="final.pt (or ckpt_<iter>.pt) of train_detector")
    p.add_argument("--proposals", required=True, help="proposal store of the test split")
    p.add_argument("--top", required=True, type=counts("--top"),
                   help="proposal counts, comma-separated (e.g. 100,500,2000)")
    p.add_argument("--voc", default=None, help="VOCdevkit VOC2007 folder (default: the checkpoint's data.voc)")
    p.add_argument("--split", default=None, help="test split (default: the checkpoint's data.test_split)")
    p.add_argument("--out", required=True, help="results folder")
    add_set_arg(p, "the checkpoint's config (e.g. detector.svd=true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_shard_arg(p, "detect only images I, I+N, ... into RESDIR/shards (no evaluation)")
    p.add_argument("--merge", action="store_true", help="merge RESDIR/shards (from every --shard I/N) and evaluate")
    args = p.parse_args(argv)
    tops, shard = args.top, args.shard
    if shard is not None and args.merge:
        raise ConfigError("--merge evaluates the shards of every --shard I/N run: give it without --shard")

    from core.datasets import VOCDataset
    from detector.model import DetectorCheckpoint
    from detector.test import test_detector

    ckpt = DetectorCheckpoint.read(args.checkpoint)
    cfg = ckpt.config(args.overrides)
    voc = args.voc or cfg.data.voc
    if not voc:
        raise ConfigError("--voc: no dataset given and the checkpoint's config has no data.voc")
    dataset = VOCDataset(voc, args.split or cfg.data.test_split)
    if args.merge:
        from detector.test import evaluate_shards, find_shards

        res = evaluate_shards(find_shards(args.out), dataset, args.out)
    else:
        res = test_detector(ckpt, args.proposals, dataset, tops, args.out, cfg=cfg, progress=not args.no_progress,
                            shard=shard)
        if shard is not None:
            print(json.dumps(res))
            return 0
    print(json.dumps({"mAP": {str(n): r["mAP"] for n, r in res.items()},
                      "mAP_all": {str(n): r["mAP_all"] for n, r in res.items()},
                      "ap": {str(n): r["ap"] for n, r in res.items()}, "out": args.out}))
    return 0


if __name__ == "__main__":
    run_main(main)
