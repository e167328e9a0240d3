"""The tiny run's outputs are pinned: proposals of every store, the weights and curves of every trained model, and
the sweep's numbers (plus the detectors tested without a score threshold, since a four-iteration detector scores
nothing above it). Recorded by ``python tests/tiny_run.py tests/data/tiny_run_pinned.json`` on the library
versions it lists; the numbers of a same config move with CPU kernels and library versions, so on other versions
the comparison is skipped (record again there, from a commit known to be right)."""
import json

import pytest

from tiny_run import ROOT, fingerprint, versions

PINNED = ROOT / "tests" / "data" / "tiny_run_pinned.json"


def test_tiny_run_outputs_are_unchanged(tiny_run):
    pinned = json.loads(PINNED.read_text())
    if pinned["versions"] != versions():
        pytest.skip(f"pinned on {pinned['versions']}, this is {versions()}")
    got = fingerprint(tiny_run)
    for part in pinned["fingerprint"]:
        assert got[part] == pinned["fingerprint"][part], part
    assert got == pinned["fingerprint"]
