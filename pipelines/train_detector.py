"""Train Fast R-CNN (Girshick, ICCV 2015) on a VOC-layout dataset with proposals from a proposal store.

    python -m pipelines.train_detector --config CFG --proposals STORE [--top N] [--out DIR] [--voc DIR]
                                       [--split SPLIT] [--set detector.iters=1000 ...]

Dataset: data.voc / data.train_split (or --voc / --split), its first data.train_images images when that is > 0 (as
pipelines.run); the store must be for that dataset and split.
Outputs in --out (default runs/<name>/detector_<method of the store>, where pipelines.run keeps it): config.yaml,
ckpt_<iter>.pt (latest), history.json, final.pt.
Running the same command again resumes from the latest checkpoint (or skips if final.pt is complete).
The last line of stdout is JSON: {"final": path or null, "iteration": int}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from core.cli import add_config_args, config_from_args, run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_detector", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--proposals", required=True, help="proposal store of the training split")
    p.add_argument("--top", type=int, default=None,
                   help="proposals per training image (default detector.train_top; 0 = all)")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>/detector_<method>)")
    p.add_argument("--voc", default=None, help="VOCdevkit VOC2007 folder (default data.voc)")
    p.add_argument("--split", default=None, help="training split (default data.train_split)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    data = cfg.data
    if args.voc:
        data = dataclasses.replace(data, voc=args.voc)
    if args.split:
        data = dataclasses.replace(data, train_split=args.split)
    cfg = dataclasses.replace(cfg, data=data)
    if not cfg.data.voc:
        from pipelines.experiment import resolve_data

        from core.distributed import run_on_main

        cfg = run_on_main(resolve_data, cfg)  # synthetic set, or a ConfigError naming data.voc (torchrun: rank 0)

    from core.datasets import VOCDataset
    from detector.train import train_detector

    # data.train_images > 0: the first N images of the split, as pipelines.run trains on
    dataset = VOCDataset(cfg.data.voc, cfg.data.train_split, max_images=cfg.data.train_images)
    if args.out:
        out = args.out
    else:  # where pipelines.run keeps the detector of the store's method (pipelines.detect --run finds it)
        from core.store import ProposalStore
        from pipelines.experiment import RunPaths

        out = str(RunPaths(cfg.run_dir).detector(ProposalStore.open(args.proposals).method))
    res = train_detector(cfg, args.proposals, dataset, out, top=args.top, progress=not args.no_progress)
    print(json.dumps({"final": res["final"], "iteration": res["iteration"]}))
    return 0


if __name__ == "__main__":
    run_main(main)
