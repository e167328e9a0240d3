"""Coordinate conventions of proposal files: box layouts, 0- / 1-based coordinates, and the resized frames that
detection codebases store boxes in (shared by the checker and the importer)."""
from __future__ import annotations

import numpy as np

from core.errors import DataError

from .formats import BASE_OFFSETS, BASES, LAYOUTS

__all__ = ["BASE_OFFSETS", "FRAMES", "parse_frame", "frame_name", "frame_scales", "to_xyxy", "undo_base"]

# the resized frames the checker tries: name -> (shorter side, longer side cap or 0)
FRAMES = {"600,1000": (600, 1000), "800,1333": (800, 1333), "600": (600, 0), "800": (800, 0)}


def parse_frame(text: str | None) -> tuple[int, int] | None:
    """'600,1000' -> (600, 1000); '800' -> (800, 0); None -> None."""
    if text is None or text == "":
        return None
    try:
        parts = [int(v) for v in str(text).split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 2 or parts[0] <= 0 or (len(parts) == 2 and parts[1] < 0):
        raise DataError(f"--resized {text!r}: expected SHORT or SHORT,MAX (e.g. 600,1000), positive integers")
    return parts[0], parts[1] if len(parts) == 2 else 0


def frame_name(frame) -> str:
    return f"{frame[0]},{frame[1]}" if frame[1] else f"{frame[0]}"


def frame_scales(w: np.ndarray, h: np.ndarray, frame) -> np.ndarray:
    """Per-image scale of the resize to `frame` (shorter side frame[0], longer side at most frame[1] if > 0)."""
    w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
    s = frame[0] / np.minimum(w, h)
    if frame[1]:
        s = np.minimum(s, frame[1] / np.maximum(w, h))
    return s


def to_xyxy(cols: np.ndarray, layout: str) -> np.ndarray:
    """The four columns of a file in `layout` -> x1 y1 x2 y2 (same units)."""
    c = np.asarray(cols, np.float64)
    if layout == "xyxy":
        return c.copy()
    if layout == "xywh":
        return np.concatenate([c[:, :2], c[:, :2] + c[:, 2:]], axis=1)
    if layout == "yxyx":
        return c[:, [1, 0, 3, 2]].copy()
    raise DataError(f"unknown layout {layout!r} (choose one of {', '.join(LAYOUTS)})")


def undo_base(b: np.ndarray, base: str) -> np.ndarray:
    if base not in BASE_OFFSETS:
        raise DataError(f"unknown base {base!r} (choose one of {', '.join(BASES)})")
    s, e = BASE_OFFSETS[base]
    return b - np.array([s, s, e, e], np.float64)
