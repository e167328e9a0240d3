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
def tiny_data(tmp_path_factory):
    """The synthetic set of the tiny run (6 trainval + 4 test images, 128 px), made once per session and shared by
    the modules that need a small real-looking dataset. Read only."""
    from tiny_run import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("tiny_data") / "shapes")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """The whole experiment, run once per test session in this process: configs/shapes.yaml made tiny
    (tests/tiny_run.py) on ``tiny_data``. Read only: the one thing that may touch it is a rerun of its own config,
    which finds every stage done (``tiny_run_overrides`` gives that config)."""
    from tiny_run import run_tiny

    return run_tiny(tmp_path_factory.mktemp("tiny") / "runs", data=tiny_data)


@pytest.fixture(scope="session")
def tiny_run_overrides(tiny_run, tiny_data) -> list[str]:
    """The --set values of ``tiny_run``'s config (on top of configs/shapes.yaml)."""
    from tiny_run import tiny_overrides

    return tiny_overrides(tiny_run.parent, tiny_run.name, tiny_data)
