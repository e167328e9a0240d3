"""The entry points' shared arguments (core/cli.py): --config / --set, --shard, comma-separated counts."""
import argparse

import pytest

from core.cli import add_config_args, add_set_arg, add_shard_arg, config_from_args, counts
from core.errors import UserError


def test_counts_sorted_distinct_positive():
    parse = counts("--top")
    assert parse("100,10, 100,2000") == [10, 100, 2000]
    for bad in ("", "x", "10,0", "-5", "1,,y"):
        with pytest.raises(UserError, match=r"^--top "):
            parse(bad)


def test_set_shard_and_config():
    p = argparse.ArgumentParser()
    add_config_args(p)
    add_shard_arg(p, "share")
    args = p.parse_args(["--set", "detector.iters=7", "--set", "seed=3", "--shard", "1/4"])
    assert args.shard == (1, 4)
    cfg = config_from_args(args)
    assert cfg.detector.iters == 7 and cfg.seed == 3
    with pytest.raises(UserError, match="0 <= I < N"):
        p.parse_args(["--shard", "4/4"])
    q = argparse.ArgumentParser()
    add_set_arg(q, "the checkpoint's config")
    assert q.parse_args([]).overrides == [] and "checkpoint" in q.format_help()
