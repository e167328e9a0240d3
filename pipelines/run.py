"""The whole experiment in one command: data -> train DeepMask -> proposals of both methods -> one Fast R-CNN per
method -> the Figure 5 sweep -> plots and a summary table.

    python -m pipelines.run --config configs/shapes.yaml [--set key=value ...]

Outputs go to `runs/<name>/`. Every stage is skipped when its output exists for the same config, so a stopped run
resumes where it was and a finished one returns in seconds.

    torchrun --nproc_per_node=G -m pipelines.run --config configs/shapes.yaml    (G processes; see the README)
"""
from __future__ import annotations

import argparse
import logging
import time

from core.cli import add_config_args, config_from_args, run_main

log = logging.getLogger("pipelines.run")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__.split("\n\n")[0])
    add_config_args(ap, default="configs/shapes.yaml")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    from pipelines.experiment import run_experiment
    from pipelines.sweep import format_summary

    t0 = time.time()
    summary = run_experiment(cfg, progress=not args.quiet)
    from core import distributed

    if not distributed.is_main():  # torchrun: rank 0 prints the summary
        return 0
    print(format_summary(summary))
    run = cfg.run_dir
    print(f"\nrun folder: {run}  (figure5.png, recall.png, sweep.json, sweep.csv, summary in {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
