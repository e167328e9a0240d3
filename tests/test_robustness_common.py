"""Shared helpers of the robustness tests (tests/test_robustness_*.py, tests/test_fuzz.py), plus checks of the helpers
themselves.

The robustness contract of every entry point: bad user input gives exactly one line
``error: <message>`` on stderr that names the file, image id or config key, exit code 2, and no traceback.
``run_entry`` calls an entry point's ``main`` in-process through ``core.cli.run_main`` (the code path of
``python -m pipelines.X``, without the 2-5 s of a fresh interpreter importing torch); ``run_module`` starts a real
subprocess where the process boundary itself is under test (exit code, kill and resume).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import xml.sax.saxutils as su
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ running
class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]

    def __repr__(self):
        return f"Result(code={self.code}, err={self.err[-2000:]!r})"


def run_entry(module: str, argv: list, env: dict | None = None) -> Result:
    """``python -m <module> argv`` in this process: exit code, stdout and stderr of ``run_main``.

    Any exception other than SystemExit propagates (that is a bug the tests must see)."""
    from core.cli import run_main

    mod = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(mod.main, [str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"  # the in-process reference runs use torch.set_num_threads(1): same sums
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_module(module: str, argv: list, timeout: float = 120, **env) -> Result:
    """A real ``python -m <module> argv`` subprocess in the repository root."""
    p = subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=REPO, env=subprocess_env(**env),
                       capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_user_error(res: Result, *needles: str) -> str:
    """Exit 2, exactly one 'error:' line containing every needle, no traceback; returns the line."""
    assert res.code == 2, res
    assert "Traceback" not in res.err, res
    lines = res.error_lines
    assert len(lines) == 1, res
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def assert_ok(res: Result) -> None:
    assert res.code == 0, res
    assert "Traceback" not in res.err and not res.error_lines, res


# ------------------------------------------------------------------------------------------------ data
def scene(seed: int, h: int = 72, w: int = 96) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A small RGB image with one flat rectangle; returns (image, box as 0-based edges)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (90, 120, 90), np.float64) + rng.normal(0, 6, (h, w, 3))
    x1, y1 = int(rng.integers(2, max(3, w // 4))), int(rng.integers(2, max(3, h // 4)))
    x2, y2 = min(w, x1 + w // 2), min(h, y1 + h // 2)
    img[y1:y2, x1:x2] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8), (x1, y1, x2, y2)


def voc_xml(image_id: str, width: int | None, height: int | None, objects: list, filename: str | None = None,
            raw_objects: str = "") -> str:
    """VOC XML text. objects: (name, xmin, ymin, xmax, ymax) 1-based inclusive, or (name, None) for no bndbox."""
    size = "" if width is None else (f"<size><width>{width}</width><height>{height}</height><depth>3</depth>"
                                     "</size>")
    objs = []
    for o in objects:
        name = su.escape(str(o[0]))
        bb = "" if o[1] is None else ("<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>"
                                      "</bndbox>".format(*o[1:5]))
        objs.append(f"<object><name>{name}</name><difficult>0</difficult>{bb}</object>")
    return (f"<annotation><folder>VOC2007</folder><filename>{filename or image_id + '.jpg'}</filename>{size}"
            f"{''.join(objs)}{raw_objects}</annotation>\n")


def make_voc(root: Path, images: dict, split: str = "val", objects: dict | None = None) -> Path:
    """A VOCdevkit VOC2007 folder. images: {image_id: HxWx3 array | bytes (file content) | None (no file)};
    objects: {image_id: list for voc_xml} (default: one 'dog' box covering the middle of the image)."""
    voc = Path(root) / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    for iid, img in images.items():
        if isinstance(img, np.ndarray):
            Image.fromarray(img).save(voc / "JPEGImages" / f"{iid}.jpg", quality=95)
            h, w = img.shape[:2]
        else:
            if img is not None:
                (voc / "JPEGImages" / f"{iid}.jpg").write_bytes(img)
            h, w = 72, 96
        objs = (objects or {}).get(iid)
        if objs is None:
            objs = [("dog", w // 4 + 1, h // 4 + 1, 3 * w // 4, 3 * h // 4)]
        (voc / "Annotations" / f"{iid}.xml").write_text(voc_xml(iid, w, h, objs))
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return voc


def jpeg_bytes(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ self-checks
def test_run_entry_reports_user_errors(tmp_path):
    res = run_entry("pipelines.evaluate", ["detections", "--voc", tmp_path / "nope", "--split", "val",
                                           "--results", tmp_path])
    assert_user_error(res, str(tmp_path / "nope"))


def test_make_voc_reads_back(tmp_path):
    from core.datasets import VOCDataset

    img, _ = scene(0)
    voc = make_voc(tmp_path, {"a": img})
    rec = VOCDataset(voc, "val").get("a")
    assert (rec.width, rec.height) == (96, 72) and rec.boxes.tolist() == [[24, 18, 72, 54]]
