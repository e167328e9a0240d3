"""Compute ranked object proposals (SelectiveSearch or DeepMask) for a dataset into a proposal store.

    python -m pipelines.propose --method selective_search --voc DIR/VOC2007 --split SPLIT --out STORE
        [--max-images N] [--workers K] [--export-coco RES.json] [--top N] [--ss-backend skimage|opencv]
        [--checkpoint CKPT] [--shard I/N] [--config CFG] [--set k=v ...]
    python -m pipelines.propose ... --coco ANN.json --images DIR ...     (a COCO dataset instead of --voc)
    python -m pipelines.propose --voc DIR/VOC2007 --split SPLIT [--max-images N] --out STORE --merge SHARD ...
    torchrun --nproc_per_node=G -m pipelines.propose ...                 (G processes share the images)

Rerunning the same command resumes: images already in the store are not recomputed. The resolved config is written
to STORE/config.yaml. `--shard I/N` (0 <= I < N) takes every N-th image starting at I into its own store (one --out
per shard, e.g. independent jobs); `--merge SHARD ...` then merges the finished shard stores into --out in the split's
order (the same dataset arguments, without --shard): the store one process would have written. Under torchrun the
ranks share the images and the merged store is written to --out directly (proposals/extract.py).
`--export-coco` writes the store as a COCO results json (`pipelines.evaluate proposals` scores it).
"""
from __future__ import annotations

import argparse
import dataclasses

from core.cli import add_config_args, add_shard_arg, config_from_args, run_main
from core.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from core.datasets import open_dataset
    from proposals import METHODS, export_coco_results, extract_proposals

    p = argparse.ArgumentParser(prog="python -m pipelines.propose", description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=METHODS, default="selective_search")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--voc", help="VOCdevkit VOC2007 folder (with --split; default: the config's data.voc)")
    src.add_argument("--coco", help="COCO instances json (with --images)")
    p.add_argument("--split", help="VOC split name (ImageSets/Main/<split>.txt)")
    p.add_argument("--images", help="image folder of --coco")
    p.add_argument("--out", required=True, help="proposal store folder (created, or resumed)")
    p.add_argument("--max-images", type=int, help="only the first N images of the split")
    add_shard_arg(p, "this process's share: images I, I+N, I+2N, ...")
    p.add_argument("--workers", type=int, help="worker processes (default: ss.workers for SelectiveSearch, 1 else)")
    p.add_argument("--top", type=int, help="keep at most N proposals per image (sets ss / deepmask / random .top_n)")
    p.add_argument("--ss-backend", choices=("skimage", "opencv"), help="sets ss.backend")
    p.add_argument("--checkpoint", help="DeepMask checkpoint (method deepmask)")
    p.add_argument("--export-coco", metavar="RES.json", help="also write the proposals as a COCO results json")
    p.add_argument("--merge", nargs="+", metavar="SHARD", help="merge finished --shard stores into --out (no "
                   "extraction)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    args = p.parse_args(argv)

    cfg = config_from_args(args)
    if args.top is not None:
        if args.top < 1:
            raise UserError(f"--top {args.top}: must be >= 1")
        cfg = dataclasses.replace(cfg, ss=dataclasses.replace(cfg.ss, top_n=args.top),
                                  deepmask=dataclasses.replace(cfg.deepmask, top_n=args.top),
                                  random=dataclasses.replace(cfg.random, top_n=args.top))
    if args.ss_backend:
        cfg = dataclasses.replace(cfg, ss=dataclasses.replace(cfg.ss, backend=args.ss_backend))
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images {args.max_images}: must be >= 1")
    if args.method == "deepmask" and not args.checkpoint and not args.merge:
        raise UserError("--method deepmask needs --checkpoint PATH (a trained DeepMask)")

    if not args.voc and not args.coco:
        if not cfg.data.voc:
            raise UserError("no dataset: give --voc DIR/VOC2007 --split S (or data.voc in the config), or --coco "
                            "ANN.json --images DIR")
        args.voc = cfg.data.voc
    dataset = open_dataset(voc=args.voc, split=args.split, coco=args.coco, images=args.images)
    ids = list(dataset.image_ids)[: args.max_images]
    if args.merge:
        if args.shard:
            raise UserError("--merge takes the shards of every --shard I/N run: give it without --shard")
        import shutil
        from pathlib import Path

        from core.store import merge_stores

        store = merge_stores(args.merge, args.out, image_ids=ids)
        cfg_file = Path(args.merge[0]) / "config.yaml"
        if cfg_file.is_file():
            shutil.copyfile(cfg_file, Path(args.out) / "config.yaml")
        if args.export_coco:
            export_coco_results(store, args.export_coco)
        return 0
    if args.shard:
        i, n = args.shard
        ids = ids[i::n]
        if not ids:
            raise UserError(f"--shard {i}/{n}: no images in this shard ({len(dataset.image_ids)} in the split)")
    workers = args.workers if args.workers is not None else (cfg.ss.workers if args.method == "selective_search"
                                                             else 1)
    store = extract_proposals(cfg, args.method, dataset, args.out, checkpoint=args.checkpoint,
                              workers=max(1, workers), image_ids=ids, progress=not args.no_progress)
    from core.distributed import is_main

    if args.export_coco and is_main():  # torchrun: rank 0 writes it
        export_coco_results(store, args.export_coco)
    return 0


if __name__ == "__main__":
    run_main(main)
