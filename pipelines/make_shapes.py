"""Write the built-in synthetic dataset (VOCdevkit layout + COCO instance masks); see core/synthetic.py.

    python -m pipelines.make_shapes --out data/shapes [--trainval 240] [--test 80] [--size 256] [--seed 0]
                                    [--workers 1] [--force]
"""
from __future__ import annotations

import argparse

from core.cli import run_main
from core.synthetic import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.make_shapes", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (gets VOC2007/, annotations/, synthetic.json)")
    p.add_argument("--trainval", type=int, default=240, help="trainval images (first 80%% = train, rest = val)")
    p.add_argument("--test", type=int, default=80, help="test images")
    p.add_argument("--size", type=int, default=256, help="longest image side in pixels (>= 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed; one seed gives byte-identical files")
    p.add_argument("--workers", type=int, default=1, help="worker processes (0 = one per CPU)")
    p.add_argument("--force", action="store_true", help="regenerate even if --out holds the same complete set")
    args = p.parse_args(argv)
    generate(args.out, trainval=args.trainval, test=args.test, size=args.size, seed=args.seed,
             workers=args.workers, force=args.force)
    return 0


if __name__ == "__main__":
    run_main(main)
