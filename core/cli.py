"""Shared entry-point plumbing: logging set-up, config arguments, and user errors as one line + exit 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .config import Config, load_config
from .errors import UserError


def add_set_arg(parser: argparse.ArgumentParser, of: str = "the config") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: overrides of ``of`` (a YAML file, a run's or a
    checkpoint's config)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override one value of {of}, e.g. --set detector.iters=500 (repeatable)",
    )


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="YAML file overriding the defaults in core/config.py")
    add_set_arg(parser)


def add_shard_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """``--shard I/N`` (0 <= I < N) into ``args.shard`` as (I, N)."""
    from .distributed import parse_shard

    parser.add_argument("--shard", type=parse_shard, metavar="I/N", help=help)


def counts(option: str) -> Callable[[str], list[int]]:
    """An argparse type for ``option``: comma-separated positive integers -> sorted distinct list."""
    def parse(text: str) -> list[int]:
        try:
            values = sorted({int(t) for t in str(text).split(",") if t.strip()})
        except ValueError:
            values = []
        if not values or values[0] <= 0:
            raise UserError(f"{option} {text!r}: expected comma-separated positive integers, e.g. 10,100,1000")
        return values

    return parse


def config_from_args(args) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def user_message(e: BaseException) -> str:
    """The message of a UserError as one line.

    A UserError raised in a DataLoader worker process is re-raised in the main process with the worker's traceback
    inside its message ("Caught ImageError in DataLoader worker process 0.\nOriginal Traceback ...\n
    core.errors.ImageError: <message>"): only the original message is kept. Line breaks become spaces."""
    msg = str(e)
    if "\nOriginal Traceback" in msg:
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        k = msg.rfind(prefix)
        if k >= 0:
            msg = msg[k + len(prefix):]
    return " ".join(ln.strip() for ln in msg.splitlines() if ln.strip())


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point: UserError -> 'error: <message>' (one line) on stderr, exit 2; Ctrl-C -> exit 130."""
    setup_logging()
    try:
        rc = fn(argv)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc or 0))
