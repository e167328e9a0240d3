"""One measurement per child process: a fork of the bench process (which has imported torch and the project but run
nothing, so no thread pool is inherited) or a fresh interpreter (``python -m pipelines.benchlib SPEC OUT``); its peak
resident memory is the child's ``ru_maxrss`` from ``os.wait4``."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from core.io import read_json, write_json

from .bench_measure import KINDS, _rss_now_mb, _setup_threads

REPO_ROOT = Path(__file__).resolve().parents[1]


def child_main(spec_path: str, out_path: str) -> int:
    """Run one measurement described by the JSON ``spec_path``; write its result (or its error) to ``out_path``."""
    spec = read_json(spec_path)
    rss0 = _rss_now_mb()
    res: dict
    try:
        info = _setup_threads(spec.get("threads", 0)) if spec["kind"] != "prepare" else {}
        t0 = time.perf_counter()
        res = KINDS[spec["kind"]](spec)
        res["wall_s"] = time.perf_counter() - t0
        res.update(info)
        res["rss_start_mb"] = rss0
        code = 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which carries on with the others
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        code = 1
    write_json(out_path, res)
    return code


def run_child(spec: dict, workdir: Path, isolation: str, timeout_s: float) -> dict:
    """Run ``spec`` in a child process; returns its result with ``peak_rss_mb`` (the child's ru_maxrss)."""
    name = spec["name"].replace("/", "_")
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    write_json(spec_path, spec)
    out_path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    if isolation == "fork":
        pid = os.fork()
        if pid == 0:  # child: never return into the parent's code
            code = 1
            try:
                code = child_main(str(spec_path), str(out_path))
            finally:
                logging.shutdown()
                os._exit(code)
        _, status, ru = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.benchlib", str(spec_path), str(out_path)],
                                cwd=str(REPO_ROOT))
        if hasattr(os, "wait4"):
            deadline = time.time() + timeout_s
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() > deadline:
                    proc.kill()
                    _, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
        else:  # pragma: no cover - no per-child rusage
            rc, ru = proc.wait(timeout=timeout_s), None
    wall = time.perf_counter() - t0
    res = read_json(out_path) if out_path.is_file() else {"error": f"child exited with code {rc} and no result"}
    if rc != 0 and "error" not in res:
        res["error"] = f"child exited with code {rc}"
    if ru is not None:
        # Linux reports kilobytes, macOS bytes
        res["peak_rss_mb"] = ru.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    res["child_wall_s"] = wall
    return res
