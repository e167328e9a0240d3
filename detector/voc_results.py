"""PASCAL VOC detection result files: the devkit's ``comp4_det_<split>_<class>.txt``, one detection per line
``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` in 1-based VOC coordinates (py-faster-rcnn
``_write_voc_results_file``): we write ``x1+1, y1+1, x2, y2`` with one decimal like it, and the score with
``repr`` (shortest exact round trip) instead of its ``{:.3f}``, so that the file keeps the exact score order and
evaluating the file gives the in-memory result (up to the 0.1 px box rounding).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from core.errors import DataError
from core.io import atomic_write_text

from .voc_eval import FlatDetections, as_boxes

RESULT_FILE_TEMPLATE = "comp4_det_{split}_{cls}.txt"  # py-faster-rcnn _get_voc_results_file_template (comp4)


def result_file(res_dir, split: str, cls: str) -> Path:
    return Path(res_dir) / RESULT_FILE_TEMPLATE.format(split=split, cls=cls)


def _flat(dets) -> FlatDetections:
    if isinstance(dets, FlatDetections) or (isinstance(dets, tuple) and len(dets) == 3):
        ids, b, s = dets
        return FlatDetections(list(ids), as_boxes(b, "detections"), np.asarray(s, np.float64).ravel())
    ids, bl, sl = [], [], []
    for iid, (b, s) in dets.items():
        b = as_boxes(b, f"image {iid!r}")
        s = np.asarray(s, np.float64).ravel()
        if s.shape[0] != b.shape[0]:
            raise DataError(f"image {iid!r}: {b.shape[0]} boxes but {s.shape[0]} scores")
        ids.extend([iid] * b.shape[0])
        bl.append(b)
        sl.append(s)
    return FlatDetections(ids, np.concatenate(bl) if bl else np.zeros((0, 4)),
                          np.concatenate(sl) if sl else np.zeros(0))


def write_results(res_dir, split: str, detections: Mapping, classes: Sequence[str]) -> list[Path]:
    """Write one devkit result file per class (an empty file for a class without detections), atomically.

    Line: ``<image_id> <score> <x1+1> <y1+1> <x2> <y2>`` (1-based VOC coordinates, one decimal as
    py-faster-rcnn's _write_voc_results_file; the score in full precision). Returns the paths written.
    """
    unknown = [c for c in detections if c not in classes]
    if unknown:
        raise DataError(f"detections for unknown class(es) {unknown}")
    paths = []
    for cls in classes:
        f = _flat(detections.get(cls, {}))
        b = f.boxes
        lines = [f"{iid} {float(s)!r} {x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}\n"
                 for iid, s, (x1, y1, x2, y2) in zip(f.image_ids, f.scores.tolist(), b.tolist())]
        bad = [iid for iid in f.image_ids if not isinstance(iid, str) or not iid or any(c.isspace() for c in iid)]
        if bad:
            raise DataError(f"class {cls!r}: image id {bad[0]!r} cannot be written to a result file")
        p = result_file(res_dir, split, cls)
        atomic_write_text(p, "".join(lines))
        paths.append(p)
    return paths


def read_result_file(path, image_ids: Iterable[str] | None = None) -> FlatDetections:
    """Read one devkit result file back to 0-based edges (x1-1, y1-1, x2, y2), keeping the line order.

    Blank lines are skipped. A malformed line raises DataError('<file>:<line>: <problem>'); with image_ids
    given, an id outside them raises DataError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: result file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    known = set(image_ids) if image_ids is not None else None
    ids: list[str] = []
    vals: list[list[str]] = []
    for ln, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise DataError(f"{path}:{ln}: expected 6 fields '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                            f"got {len(parts)}")
        if known is not None and parts[0] not in known:
            raise DataError(f"{path}:{ln}: image id {parts[0]!r} is not in the split")
        ids.append(parts[0])
        vals.append(parts[1:])
    try:
        arr = np.array(vals, dtype=np.float64).reshape(-1, 5)
    except ValueError:
        for ln, line in enumerate(text.splitlines(), 1):  # find the line for the message
            parts = line.split()
            for tok in parts[1:]:
                try:
                    float(tok)
                except ValueError:
                    raise DataError(f"{path}:{ln}: {tok!r} is not a number") from None
        raise DataError(f"{path}: cannot parse numbers") from None
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        ln = [i for i, line in enumerate(text.splitlines(), 1) if line.split()][k]
        raise DataError(f"{path}:{ln}: non-finite value")
    boxes = arr[:, 1:].copy()
    boxes[:, :2] -= 1.0
    return FlatDetections(ids, boxes, arr[:, 0].copy())


def read_results(res_dir, split: str, classes: Sequence[str], image_ids: Iterable[str] | None = None,
                 strict: bool = True) -> dict:
    """Read the result files of all classes: {class: FlatDetections}.

    A missing file raises DataError naming it; with ``strict`` a ``comp4_det_<split>_<name>.txt`` whose name is
    not a class raises DataError too (a typo would otherwise silently give AP 0).
    """
    res_dir = Path(res_dir)
    if not res_dir.is_dir():
        raise DataError(f"{res_dir}: results folder not found")
    if strict:
        prefix, suffix = f"comp4_det_{split}_", ".txt"
        for name in sorted(os.listdir(res_dir)):
            if name.startswith(prefix) and name.endswith(suffix):
                c = name[len(prefix):-len(suffix)]
                if c not in classes:
                    raise DataError(f"{res_dir / name}: unknown class {c!r}")
    ids = list(image_ids) if image_ids is not None else None
    return {c: read_result_file(result_file(res_dir, split, c), ids) for c in classes}
