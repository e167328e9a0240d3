"""Import precomputed proposals of another method into a proposal store (and export a store to those formats).

`import_proposals` reads a file (proposals/formats.py), matches its image ids to a split, runs the checker
(proposals/check.py) and, unless it refuses, writes a store exactly like `extract_proposals` writes one
(core/store.py): one ranked npz per image, boxes float32 x1 y1 x2 y2 in 0-based pixel edges of the original image,
`meta.json` with method ``imported:<name>``, params ``{"imported": {file, sha1, format, layout, base, resized,
rank_by, ...}}``, the dataset's name and split, and the split's image ids in order; plus ``import.json`` (the
checker's report). Recall (`pipelines.evaluate proposals`), `pipelines.train_detector`, `pipelines.test_detector`
and `pipelines.sweep` read it like any other store.

What the import does to the boxes, in order: the file's columns are read in the given (or the format's) layout,
base and frame; boxes are clipped to the image; boxes with no area are dropped; each image is ranked by score,
highest first (stable: ties keep the file's order), or kept in file order with ``rank_by='order'``, or when the file
has no scores (rank scores ``1 - r/n`` then). Nothing else: duplicates and unusual boxes are kept.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.errors import DataError
from core.io import write_json

from . import IMPORTED_PREFIX, rank_scores
from .check import REFUSE, Report, check_proposals
from .conventions import frame_name, frame_scales, parse_frame, to_xyxy, undo_base
from .formats import FORMATS, ProposalFile, read_proposal_file
from .writers import write_proposal_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class ImportRefused(DataError):
    """The checker refused the file; `.report` holds its findings."""

    def __init__(self, message: str, report: Report, info: dict):
        super().__init__(message)
        self.report = report
        self.info = info


@dataclass
class ImportResult:
    report: Report
    info: dict  # file, format, conventions, counts
    store: str | None  # the store's path (None with check_only)


def method_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise DataError(f"--name {name!r}: use letters, digits, '_', '.', '-' only")
    return IMPORTED_PREFIX + name


def default_name(path) -> str:
    stem = Path(path).name.split(".")[0] or "proposals"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", stem)


def match_ids(file_ids, split_ids) -> tuple[dict, list, list[str]]:
    """file id -> split id (exactly, else by file stem, else by integer value), the unmatched file ids, notes."""
    split = set(split_ids)
    by_int: dict[int, list[str]] = {}
    for s in split_ids:
        if s.isdigit():
            by_int.setdefault(int(s), []).append(s)
    mapping, unknown = {}, []
    n_stem = n_int = 0
    for f in file_ids:
        if f in split:
            mapping[f] = f
            continue
        stem = Path(f).stem if ("/" in f or "\\" in f or "." in f) else None
        if stem is not None and stem in split:
            mapping[f] = stem
            n_stem += 1
            continue
        key = stem if stem is not None else f
        if key.isdigit() and len(by_int.get(int(key), [])) == 1:
            mapping[f] = by_int[int(key)][0]
            n_int += 1
            continue
        unknown.append(f)
    seen: dict[str, str] = {}
    for f, s in mapping.items():
        if s in seen:
            raise DataError(f"file image ids {seen[s]!r} and {f!r} both name image {s!r} of the split")
        seen[s] = f
    notes = []
    if n_stem:
        notes.append(f"{n_stem} image ids matched by file stem (e.g. a path or a name with an extension)")
    if n_int:
        notes.append(f"{n_int} image ids matched by integer value (e.g. 5 -> '000005')")
    return mapping, unknown, notes


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def image_sizes(dataset, ids, progress: bool = True) -> dict:
    """split id -> (width, height) from the annotations (VOC XML size / COCO image entry)."""
    out = {}
    for i in tqdm(ids, desc="image sizes", unit="img", disable=not progress or len(ids) < 200):
        r = dataset.get(i)
        if r.width <= 0 or r.height <= 0:
            raise DataError(f"image {i}: no width/height in its annotation")
        out[i] = (int(r.width), int(r.height))
    return out


def _convert(raw: np.ndarray, w: float, h: float, layout: str, base: str, frame, rel: bool) -> np.ndarray:
    """The file's columns -> x1 y1 x2 y2 edges in the original image (not clipped)."""
    b = np.asarray(raw, np.float64)
    if rel:
        b = b * np.array([w, h, w, h])
    b = undo_base(to_xyxy(b, layout), base)
    if frame:
        b = b / frame_scales(np.array([w]), np.array([h]), frame)[0]
    return b


def _split_images(pf: ProposalFile, split_ids: list[str]) -> tuple[dict, list, list, list]:
    """The file's images by split id: (by_split, unknown file ids, missing split ids, notes on the matching)."""
    if pf.positional:
        mapping = {i: i for i in pf.images}
        unknown = [f"#{len(split_ids) + k}" for k in range(pf.extra_entries)]
        notes = []
    else:
        mapping, unknown, notes = match_ids(list(pf.images), split_ids)
    by_split = {mapping[f]: img for f, img in pf.images.items() if f in mapping}
    missing = [i for i in split_ids if i not in by_split]
    if missing and pf.format == "coco":
        notes.append("a COCO results json has no entry for an image without proposals: if the missing images have "
                     "none, --allow-missing")
    return by_split, unknown, missing, notes


def _refuse(path, report: Report, info: dict) -> None:
    fixes = [f.fix for f in report.findings if f.severity == REFUSE and f.fix]
    raise ImportRefused(f"{path}: refused ({', '.join(report.refused)})" +
                        (f"; fix: {'; '.join(dict.fromkeys(fixes))}" if fixes else "") +
                        " (--force imports it as read)", report, info)


def _masks_fit(path, by_split: dict, known: list, sizes: dict) -> bool:
    """Whether every image has masks, all of its own size (else none are imported, with a warning)."""
    if not known or any(by_split[i].masks is None for i in known):
        return False
    for i in known:
        w, h = sizes[i]
        if any([int(v) for v in m["size"]] != [h, w] for m in by_split[i].masks):
            log.warning("%s: masks of image %s are not %dx%d: masks not imported", path, i, h, w)
            return False
    return True


def _store_image(store, i, raw, size, conv: dict, rank_by: str, has_masks: bool) -> tuple[int, int, int, int]:
    """One image's boxes converted, clipped to the image, emptied ones dropped, ranked; (read, stored, clipped,
    dropped)."""
    w, h = size
    b = _convert(raw.boxes, w, h, **conv)
    c = b.copy()
    c[:, [0, 2]] = np.clip(c[:, [0, 2]], 0, w)
    c[:, [1, 3]] = np.clip(c[:, [1, 3]], 0, h)
    keep = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    idx = np.flatnonzero(keep)
    s = raw.scores
    if s is not None and rank_by == "score" and len(idx) > 0 and not np.all(s[idx] == s[idx][0]):
        idx = idx[np.argsort(-s[idx], kind="stable")]
        scores = s[idx].astype(np.float32)
    else:
        scores = rank_scores(len(idx), len(idx))
    store.put(i, c[idx].astype(np.float32), scores, [raw.masks[k] for k in idx] if has_masks else None)
    return len(b), len(idx), int(np.any(c != b, axis=1).sum()), int((~keep).sum())


def import_proposals(path, dataset, out=None, *, fmt: str = "auto", name: str | None = None,
                     layout: str | None = None, base: str | None = None, resized: str | None = None,
                     rank_by: str = "score", allow_missing: bool = False, force: bool = False,
                     check_only: bool = False, trust_pickle: bool = False, overwrite: bool = False,
                     progress: bool = True) -> ImportResult:
    """Check a proposal file against `dataset` (a VOCDataset / CocoDataset) and write it into the store `out`.

    layout / base / resized override the format's conventions ('xyxy' | 'xywh' | 'yxyx'; 'edges0' | 'pixels1' |
    'edges1' | 'pixels0'; 'SHORT[,MAX]'). Raises ImportRefused (a DataError, with the report) when the checker
    refuses the file, unless `force`."""
    from core.store import ProposalStore

    path = Path(path)
    if rank_by not in ("score", "order"):
        raise DataError(f"--rank-by {rank_by!r}: choose score or order")
    if not check_only and out is None:
        raise DataError("--out STORE is needed (or --check-only)")
    frame = parse_frame(resized)
    method = method_name(name or default_name(path))
    split_ids = [str(i) for i in dataset.image_ids]
    pf: ProposalFile = read_proposal_file(path, fmt, split_ids=split_ids, trust_pickle=trust_pickle)
    by_split, unknown, missing, notes = _split_images(pf, split_ids)
    known = [i for i in split_ids if i in by_split]
    sizes = image_sizes(dataset, known, progress)
    L, B = layout or pf.layout, base or pf.base
    report = check_proposals({i: by_split[i] for i in known}, sizes, layout=L, base=B, resized=frame,
                             rel_mode=pf.rel_mode, format_has_scores=pf.has_scores, rank_by=rank_by,
                             unknown_ids=unknown, missing_ids=missing, positional=pf.positional,
                             allow_missing=allow_missing, n_file_images=len(pf.images) + pf.extra_entries,
                             id_notes=notes + pf.notes)
    info = {"file": str(path), "format": pf.format, "dataset": dataset.name, "split": dataset.split,
            "layout": L, "base": B, "resized": frame_name(frame) if frame else None, "rank_by": rank_by}
    if check_only:
        return ImportResult(report, info, None)
    if report.refused and not force:
        _refuse(path, report, info)

    has_masks = _masks_fit(path, by_split, known, sizes)
    params = {"imported": {"file": str(path.resolve()), "sha1": _file_sha1(path), "format": pf.format, "layout": L,
                           "base": B, "resized": info["resized"], "rank_by": rank_by,
                           "allow_missing": bool(allow_missing), "forced": bool(force and report.refused)}}
    store = ProposalStore.create(out, method=method, params=params, dataset=dataset.name, split=dataset.split,
                                 image_ids=split_ids, has_masks=has_masks, overwrite=overwrite)
    if store.meta.get("complete"):
        log.info("%s: already holds this import of %s", store.path, path)
        return ImportResult(report, {**info, "method": method, "skipped": True}, str(store.path))
    conv = {"layout": L, "base": B, "frame": frame, "rel": pf.rel_mode}
    totals = np.zeros(4, np.int64)  # read, stored, clipped, dropped
    for i in tqdm(split_ids, desc="import", unit="img", disable=not progress):
        if i not in by_split:  # --allow-missing
            store.put(i, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [] if has_masks else None)
            continue
        totals += _store_image(store, i, by_split[i], sizes[i], conv, rank_by, has_masks)
    store.finalize()
    n_in, n_out, n_clip, n_drop = (int(v) for v in totals)
    info.update(method=method, boxes_read=n_in, boxes_stored=n_out, boxes_clipped=n_clip, boxes_dropped=n_drop,
                has_masks=has_masks)
    write_json(Path(out) / "import.json", {**info, "report": report.as_dict()}, indent=1)
    log.info("%s: %d boxes of %d images imported as '%s' (%d clipped, %d dropped)", store.path, n_out,
             len(split_ids), method, n_clip, n_drop)
    return ImportResult(report, info, str(store.path))


def export_store(store, path, fmt: str, top: int | None = None) -> int:
    """Write a proposal store in format `fmt` (formats.FORMATS); returns the number of boxes written."""
    from core.store import ProposalStore

    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (choose one of {', '.join(FORMATS)})")
    store = ProposalStore.open(store) if isinstance(store, (str, Path)) else store
    masks = store.has_masks and fmt == "coco"
    entries = []
    for i in store.image_ids:
        p = store.get(i, top=top, masks=masks)
        entries.append((i, p.boxes, p.scores, p.masks if masks else None))
    write_proposal_file(entries, path, fmt)
    n = sum(len(e[1]) for e in entries)
    log.info("wrote %d proposals of %d images from %s to %s (%s)", n, len(entries), store.path, path, fmt)
    return n
