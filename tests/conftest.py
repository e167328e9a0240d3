import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole experiment, run once per test session in this process: configs/shapes.yaml made tiny
    (tests/tiny_run.py). Tests read it; none may write into it."""
    from tiny_run import run_tiny

    return run_tiny(tmp_path_factory.mktemp("tiny") / "runs")
