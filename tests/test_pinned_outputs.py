"""The tiny run's outputs are pinned: proposals of every store, the weights and curves of every trained model, and
the sweep's numbers (plus the detectors tested without a score threshold, since a four-iteration detector scores
nothing above it). Recorded by ``python tests/tiny_run.py tests/data/tiny_run_pinned.json`` (one pin per set of
library versions and CPU units: AMX, AVX512-BF16, AVX512); the numbers of a same config move with CPU kernels and library versions,
so where no pin matches the comparison is skipped (record one there, from a commit known to be right)."""
import json

import pytest

from tiny_run import ROOT, fingerprint, versions

PINNED = ROOT / "tests" / "data" / "tiny_run_pinned.json"


def test_tiny_run_outputs_are_unchanged(tiny_run):
    pins = json.loads(PINNED.read_text())["pins"]
    here = versions()
    pinned = next((p for p in pins if p["versions"] == here), None)
    if pinned is None:
        pytest.skip(f"pinned on {[p['versions'] for p in pins]}, this is {here}")
    got = fingerprint(tiny_run)
    for part in pinned["fingerprint"]:
        assert got[part] == pinned["fingerprint"][part], part
    assert got == pinned["fingerprint"]
