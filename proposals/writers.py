"""Writers of the proposal files proposals/formats.py reads (``pipelines.import_proposals --export``, the
round-trip tests): this project's boxes (float32 x1 y1 x2 y2, 0-based pixel edges) in each format's convention."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np

from core.errors import DataError

from .formats import BASE_OFFSETS, FORMATS
from .pickles import BoxMode


def _to_layout(boxes: np.ndarray, layout: str) -> np.ndarray:
    b = np.asarray(boxes, np.float64)
    if layout == "xyxy":
        return b.copy()
    if layout == "xywh":
        return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
    if layout == "yxyx":
        return b[:, [1, 0, 3, 2]].copy()
    raise ValueError(layout)


def _to_base(boxes: np.ndarray, base: str) -> np.ndarray:
    s, e = BASE_OFFSETS[base]
    return boxes + np.array([s, s, e, e], np.float64)


def write_proposal_file(entries, path, fmt: str) -> None:
    """Write [(image_id, boxes (n,4) xyxy edges0, scores (n,), masks or None)] in format `fmt` (atomically; for
    hosang_mat, `path` is a folder of <image_id>.mat files)."""
    from core.io import atomic_write_bytes, atomic_write_text

    path = Path(path)
    entries = [(str(i), np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32).reshape(-1), m)
               for i, b, s, m in entries]
    if fmt == "coco":
        out = []
        for iid, b, s, m in entries:
            wh = _to_layout(b, "xywh")  # float64 of float32: x + w gives x2 back exactly
            for k in range(len(b)):
                d = {"image_id": iid, "bbox": [float(v) for v in wh[k]], "score": float(s[k])}
                if m is not None:
                    seg = dict(m[k])
                    if isinstance(seg.get("counts"), bytes):
                        seg["counts"] = seg["counts"].decode("ascii")
                    d["segmentation"] = seg
                out.append(d)
        atomic_write_text(path, json.dumps(out) + "\n")
    elif fmt in ("rcnn_mat", "hosang_mat"):
        import scipy.io

        layout = "yxyx" if fmt == "rcnn_mat" else "xyxy"
        if fmt == "rcnn_mat":
            ids = np.empty(len(entries), dtype=object)
            cells = np.empty(len(entries), dtype=object)
            for k, (iid, b, _s, _m) in enumerate(entries):
                ids[k] = iid
                cells[k] = _to_base(_to_layout(b, layout), "pixels1")
            buf = io.BytesIO()
            scipy.io.savemat(buf, {"images": ids, "boxes": cells}, do_compression=True)
            atomic_write_bytes(path, buf.getvalue())
        else:
            path.mkdir(parents=True, exist_ok=True)
            for iid, b, s, _m in entries:
                buf = io.BytesIO()
                scipy.io.savemat(buf, {"boxes": _to_base(_to_layout(b, layout), "pixels1"),
                                       "scores": s.astype(np.float64).reshape(-1, 1)}, do_compression=True)
                atomic_write_bytes(path / iid[:2] / f"{iid}.mat", buf.getvalue())
    elif fmt == "detectron2":
        obj = {"ids": [iid for iid, *_ in entries], "boxes": [b for _, b, _, _ in entries],
               "objectness_logits": [s for _, _, s, _ in entries], "bbox_mode": int(BoxMode.XYXY_ABS)}
        atomic_write_bytes(path, pickle.dumps(obj, protocol=4))
    elif fmt == "mmdet":
        obj = [np.concatenate([b, s[:, None]], axis=1).astype(np.float32) for _, b, s, _ in entries]
        atomic_write_bytes(path, pickle.dumps(obj, protocol=4))
    elif fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, image_ids=np.array([iid for iid, *_ in entries], dtype=str),
                 boxes=np.concatenate([b for _, b, _, _ in entries]) if entries else np.zeros((0, 4), np.float32),
                 scores=np.concatenate([s for _, _, s, _ in entries]) if entries else np.zeros(0, np.float32),
                 counts=np.array([len(b) for _, b, _, _ in entries], np.int64))
        atomic_write_bytes(path, buf.getvalue())
    else:
        raise DataError(f"unknown format {fmt!r} (choose one of {', '.join(FORMATS)})")
