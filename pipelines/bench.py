"""Benchmark: time per image and peak memory of every stage, against its peers, in one run.

    python -m pipelines.bench [--images DIR/VOC2007[:SPLIT] | --images FOLDER] [--num-images 20] [--device cpu|cuda]
        [--json OUT.json] [--repeats N] [--warmup N] [--only a,b,...] [--quick] [--threads N]
        [--isolation fork|spawn] [--weights auto|random|RUN_DIR] [--config CFG] [--set KEY=VALUE ...]

Measures DeepMask full-scene inference (trunks small / efficientnet_lite0 / vgg_a, scales batched against one at a
time, with a check that both give identical proposals), SelectiveSearch (scikit-image and OpenCV backends), Fast
R-CNN test at 100 and 2000 proposals (small / efficientnet_lite0 / vgg16), training throughput of both stages, the
VOC07 metric on 5,000 images, and the peak resident memory of each (every measurement runs in its own process).
Prints a table and writes JSON (--json): {argv, host, settings, config, load_avg_start/end, results: {name:
{unit, median, p10, p90, min, max, n, peak_rss_mb, rss_start_mb, torch_threads, per_item, detail, ...}}, ratios:
{"a / b": {median_ratio, paired}}, checks: {"deepmask.<trunk>: batched == per_scale": {identical, ...}}, errors}.

Without --images a few synthetic images are made (so it runs anywhere); `--images DIR/VOC2007:val` takes the first
--num-images images of that split. The DeepMask head timed is the official code's cheaper one
(deepmask.seg_channels=128) unless --set deepmask.seg_channels=512. --quick is a smoke run of a few seconds per
measurement (tiny images and heads; its numbers mean nothing). --weights auto (the default) times the trained
DeepMask and Fast R-CNN of the config's run folder where they exist (random heads otherwise, and with --quick):
the work of a random head differs from a trained one's. See pipelines/benchlib.py for the details.
"""
from __future__ import annotations

import argparse
import logging

from core.cli import add_config_args, run_main
from core.errors import UserError

log = logging.getLogger("pipelines.bench")


def main(argv: list[str] | None = None) -> int:
    import sys

    from core.config import load_config, to_dict
    from core.io import write_json

    from . import benchlib

    p = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n")[0])
    p.add_argument("--images", help="VOC2007 folder[:split] (default split val) or a folder of images "
                                    "(default: synthetic images)")
    p.add_argument("--num-images", type=int, default=20, help="images timed per method (default 20)")
    p.add_argument("--heavy-images", type=int, default=5, help="images for the VGG trunks (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per image (median kept; default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--only", default="", help="comma-separated measurement names or patterns (e.g. "
                                             "'deepmask.efficientnet_lite0.*,ss'; a name is also a prefix: "
                                             "'=NAME' for that measurement alone); see --list")
    p.add_argument("--list", action="store_true", help="list the measurement names and exit")
    p.add_argument("--quick", action="store_true", help="fast smoke run (tiny images and heads)")
    p.add_argument("--threads", type=int, default=0, help="torch/OpenCV threads (default: torch's default)")
    p.add_argument("--isolation", choices=("fork", "spawn"), default="fork",
                   help="child process per measurement: fork of this process (default) or a fresh interpreter")
    p.add_argument("--train-iters", type=int, default=4, help="timed training iterations (default 4)")
    p.add_argument("--voc-images", type=int, default=5000, help="images of the VOC07 metric benchmark")
    p.add_argument("--workdir", help="keep the children's specs, results and outputs here")
    p.add_argument("--weights", default="auto", metavar="auto|random|RUN_DIR",
                   help="models timed: 'auto' (default) the trained DeepMask (RUN/deepmask/best.pt) and Fast R-CNN "
                        "(RUN/detector_deepmask/final.pt) of the config's run folder RUN where they exist, else random "
                        "heads; 'random' random heads; or another run folder")
    add_config_args(p)
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(benchlib.all_measurements()))
        return 0
    overrides = list(benchlib.DEFAULT_OVERRIDES) + (list(benchlib.QUICK_OVERRIDES) if args.quick else []) \
        + list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.threads < 0:
        raise UserError(f"--threads: must be >= 0, got {args.threads}")
    voc_images = args.voc_images if not args.quick or args.voc_images != 5000 else 100
    opts = benchlib.BenchOptions(
        images=args.images, num_images=args.num_images if not args.quick else min(args.num_images, 2),
        heavy_images=args.heavy_images, device=args.device, repeats=args.repeats, warmup=args.warmup,
        only=[s.strip() for s in args.only.split(",") if s.strip()], quick=args.quick, threads=args.threads,
        isolation=args.isolation, train_iters=args.train_iters if not args.quick else 1,
        voc_images=voc_images, workdir=args.workdir, config=to_dict(cfg),
        # --quick's tiny heads are not the run's: its 'auto' means random heads (a folder given is still used)
        weights=benchlib.trained_weights("random" if args.quick and args.weights == "auto" else args.weights, cfg),
        argv=["python", "-m", "pipelines.bench"] + list(sys.argv[1:] if argv is None else argv))
    doc = benchlib.run_bench(opts, progress=lambda name, r: log.info("bench: %s done: %s", name, {
        k: r.get(k) for k in ("median", "unit", "peak_rss_mb", "error")}))
    if args.json:
        write_json(args.json, doc, indent=1)
        log.info("wrote %s", args.json)
    print(benchlib.format_table(doc))
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    run_main(main)
