"""Train DeepMask (paper §3) on COCO-format instance masks.

    python -m pipelines.train_proposer --config CFG [--set deepmask.iters=2000 ...] [--out DIR] [--no-progress]

Data: ``deepmask.train_sets`` / ``deepmask.val_sets`` (lists of {ann: instances.json, images: folder}); with
``data.synthetic: true`` and no train_sets, the built-in shapes set (generated when missing) is used. Writes
``DIR/last.pt`` (resumable), ``DIR/best.pt`` (best by validation), ``DIR/config.yaml``, ``DIR/metrics.json``;
DIR defaults to ``runs/<name>/deepmask``. Running the same command again resumes (or returns at once when done).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from core.cli import add_config_args, config_from_args, run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_proposer", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--out", help="output folder (default runs/<name>/deepmask)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if cfg.data.synthetic and not cfg.deepmask.train_sets:
        from pipelines.experiment import resolve_data

        # resolve_data fills train_sets with the synthetic trainval json (and val_sets with its test json, which we
        # do not use for model selection: validation holds out part of trainval instead).
        from core.distributed import run_on_main

        cfg = run_on_main(resolve_data, cfg)  # torchrun: rank 0 makes the data, the others wait
        cfg = dataclasses.replace(cfg, deepmask=dataclasses.replace(cfg.deepmask, val_sets=[]))
    from proposals.deepmask.train import train_deepmask

    from pipelines.experiment import RunPaths

    out = Path(args.out) if args.out else RunPaths(cfg.run_dir).deepmask
    result = train_deepmask(cfg, out, progress=not args.no_progress)
    import logging

    logging.getLogger("pipelines.train_proposer").info(
        "deepmask: %d iterations; best %s; last validation %s", result["iteration"], result["best"],
        {k: round(v, 4) for k, v in result["metrics"].items()} if result["metrics"] else "-")
    return 0


if __name__ == "__main__":
    run_main(main)
