"""Rewrite a checkpoint of an earlier version (numpy RNG states inside) into the plain-data form this version reads.

    python -m pipelines.convert_checkpoint IN.pt [OUT.pt]

Checkpoints are data, not code: this version reads them with torch.load(weights_only=True) and refuses anything
else. Older checkpoints (DeepMask last.pt / best.pt, Fast R-CNN ckpt_<iter>.pt / final.pt) hold numpy arrays in
their RNG states. This reads IN allowing numpy's numeric arrays and scalars and nothing else (so no code in the file
is run, whoever wrote it; anything else is refused), turns them into tensors and python numbers, and writes OUT
(default: IN itself, the original kept as IN.orig). A converted training checkpoint resumes exactly as before.
"""
from __future__ import annotations

import argparse

from core.cli import run_main


def main(argv: list[str] | None = None) -> int:
    from core.io import convert_checkpoint

    p = argparse.ArgumentParser(prog="python -m pipelines.convert_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("src", metavar="IN", help="checkpoint to convert")
    p.add_argument("dst", metavar="OUT", nargs="?", default=None,
                   help="where to write it (default: IN, the original kept as IN.orig)")
    args = p.parse_args(argv)
    res = convert_checkpoint(args.src, args.dst)
    if not res["converted"] and res["dst"] == res["src"]:
        print(f"{res['src']}: plain data already; nothing to do")
    elif not res["converted"]:
        print(f"{res['src']}: plain data already; copied to {res['dst']}")
    else:
        kept = f" (the original is kept as {res['kept']})" if res["kept"] else ""
        print(f"{res['src']}: converted to plain data -> {res['dst']}{kept}")
    return 0


if __name__ == "__main__":
    run_main(main)
