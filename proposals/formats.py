"""Proposal files of other projects: readers (for `pipelines.import_proposals`; the writers, for the round-trip tests
and for handing this project's proposals to other code, are in proposals/writers.py).

A reader returns a `ProposalFile`: per image id (as the file names it, a string) the four box columns exactly as
the file holds them (float64, not converted), the scores (or None) and COCO RLE masks (or None), and the
conventions its format declares (`layout`, `base`). Conversion to this project's boxes (float32 x1 y1 x2 y2,
0-based pixel edges) and every sanity check happen afterwards (proposals/importing.py, proposals/check.py): a file
written in another convention than its format's is then diagnosed instead of silently converted.

Box conventions (`base`): ``edges0`` 0-based pixel edges (this project, COCO, detectron2, mmdetection >= 2: a box
over pixels 0..9 is 0, 10); ``pixels1`` 1-based inclusive pixel indices (Matlab, VOC XML, R-CNN: the same box is
1, 10); ``edges1`` 0-based edges shifted by one (every coordinate one too large: 1, 11); ``pixels0`` 0-based
inclusive pixel indices (py-faster-rcnn's roidb: 0, 9). `layout`: ``xyxy`` (x1 y1 x2 y2), ``xywh`` (x y w h),
``yxyx`` (y1 x1 y2 x2).

Formats (what each reader assumes):

``coco``        COCO results json: a list of {image_id, bbox [x, y, w, h], score[, segmentation (RLE)]} in any
                order. xywh, edges0; image_id an int or a string.
``rcnn_mat``    R-CNN / Fast R-CNN ``selective_search_data/<set>.mat``: ``images`` (cell of image id strings) and
                ``boxes`` (cell of n x 4 double, [y1 x1 y2 x2]), yxyx, pixels1 (Fast R-CNN reads them as
                ``boxes[:, (1, 0, 3, 2)] - 1``, its 0-based inclusive pixels). No scores: the file order is the
                ranking.
``hosang_mat``  Hosang et al.'s proposal benchmark (Matlab). ASSUMED, not specified anywhere we can read: a folder
                of per-image ``<image_id>.mat`` files at any depth (e.g. their ``<method>/<id[:2]>/<id>.mat``
                tree), each with ``boxes`` (n x 4, [x1 y1 x2 y2]) and optional ``scores`` (n or n x 1; absent: the
                file order is the ranking); or a single .mat with ``images`` (cell of ids), ``boxes`` (cell of
                n x 4) and ``scores`` (cell). xyxy, pixels1 (Matlab pixel indices, as every box of that code).
                When a file does not fit, the checker says so (e.g. 0-based boxes -> ``zero_based``).
``detectron2``  detectron2's precomputed-proposal pickle (read by its ``load_proposals_into_dataset``): a dict with
                ``ids`` (image ids), ``boxes`` (list of n x 4 arrays), ``objectness_logits`` (list of n arrays: the
                scores), optional ``bbox_mode`` (BoxMode or int: XYXY_ABS = 0, the default, XYWH_ABS = 1,
                XYXY_REL = 2 and XYWH_REL = 3 relative to the image size). edges0.
``mmdet``       mmdetection's RPN results (``tools/test.py --out proposals.pkl``): a list with one entry per image
                in the dataset's order (for VOC: the split file's order), each an (n, 5) array x1 y1 x2 y2 score
                ((n, 4): no scores). xyxy, edges0. Matched to the split by position.
``npz``         a plain numpy file (``np.savez``; read without pickle): ``image_ids`` (N,) strings; either
                ``boxes`` (M, 4) of all images concatenated in ``image_ids`` order with ``counts`` (N,) boxes per
                image and optional ``scores`` (M,), or per-image arrays ``boxes_<k>`` / ``scores_<k>`` for
                k = 0 .. N-1 (the index into ``image_ids``). xyxy, edges0, ranked best first within an image.

Pickles are read by proposals/pickles.py (a restricted unpickler).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import DataError

from .pickles import BoxMode, load_pickle

log = logging.getLogger(__name__)

FORMATS = ("coco", "rcnn_mat", "hosang_mat", "detectron2", "mmdet", "npz")
LAYOUTS = ("xyxy", "xywh", "yxyx")
BASES = ("edges0", "pixels1", "edges1", "pixels0")
# (start offset, end offset) that each base adds to 0-based edges: raw x1 = x1 + start, raw x2 = x2 + end
BASE_OFFSETS = {"edges0": (0, 0), "pixels1": (1, 0), "edges1": (1, 1), "pixels0": (0, -1)}
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")


@dataclass
class RawImage:
    boxes: np.ndarray  # (n, 4) float64, the columns as the file holds them
    scores: np.ndarray | None = None  # (n,) float64
    masks: list | None = None  # COCO RLE per box


@dataclass
class ProposalFile:
    path: str
    format: str
    images: dict  # image id as the file names it (str) -> RawImage, in file order
    layout: str  # what the format declares
    base: str
    has_scores: bool = True  # the format carries scores (rcnn_mat does not: its order is the ranking); a file of a
    # format with scores may still lack them (RawImage.scores None: the checker's missing_scores)
    positional: bool = False  # ids are positions in the split (mmdet): matched by order, not by name
    extra_entries: int = 0  # positional files: entries beyond the split's length
    notes: list = field(default_factory=list)
    rel_mode: bool = False  # detectron2 XYXY_REL / XYWH_REL: columns are fractions of the image size


# ------------------------------------------------------------------------------------------------- helpers


def _boxes(a, where: str) -> np.ndarray:
    try:
        b = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: boxes are not numbers") from None
    if b.size == 0:
        return np.zeros((0, 4), np.float64)
    if b.ndim == 1 and b.size == 4:
        b = b.reshape(1, 4)
    if b.ndim != 2 or b.shape[1] < 4:
        raise DataError(f"{where}: expected an (n, 4) box array, got shape {tuple(b.shape)}")
    b = b[:, :4]
    if not np.isfinite(b).all():
        raise DataError(f"{where}: boxes contain NaN or infinite values")
    return b


def _scores(a, n: int, where: str) -> np.ndarray | None:
    if a is None:
        return None
    try:
        s = np.asarray(a, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{where}: scores are not numbers") from None
    if s.size == 0 and n == 0:
        return np.zeros(0, np.float64)
    if len(s) != n:
        raise DataError(f"{where}: {n} boxes but {len(s)} scores")
    if not np.isfinite(s).all():
        raise DataError(f"{where}: scores contain NaN or infinite values")
    return s


def _id(v) -> str:
    """An image id as a string: numpy/Matlab strings and bytes decoded, ints as digits, floats that are ints too."""
    if isinstance(v, np.ndarray):
        v = v.reshape(-1)
        if v.dtype.kind in "US" and v.size == 1:
            v = v[0]
        elif v.dtype.kind in "US":  # Matlab char matrix
            v = "".join(str(c) for c in v)
        elif v.size == 1:
            v = v[0]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (np.floating, float)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


# --------------------------------------------------------------------------------------------------- readers


def read_coco(path) -> ProposalFile:
    from core.io import read_json

    res = read_json(path)
    if not isinstance(res, list):
        raise DataError(f"{path}: expected a COCO results list [{{image_id, bbox, score}}, ...], "
                        f"got a JSON {type(res).__name__}")
    per: dict[str, list] = {}
    for k, r in enumerate(res):
        if not isinstance(r, dict) or "image_id" not in r or "bbox" not in r:
            raise DataError(f"{path}: entry {k} needs 'image_id' and 'bbox' ([x, y, w, h])")
        b = r["bbox"]
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            raise DataError(f"{path}: entry {k}: bbox {b!r} is not 4 numbers")
        try:
            b = [float(v) for v in b]
            s = float(r["score"]) if "score" in r else None
        except (TypeError, ValueError):
            raise DataError(f"{path}: entry {k}: bbox or score is not a number") from None
        if not all(math.isfinite(v) for v in b) or (s is not None and not math.isfinite(s)):
            raise DataError(f"{path}: entry {k}: NaN or infinite bbox or score")
        per.setdefault(_id(r["image_id"]), []).append((b, s, r.get("segmentation")))
    images = {}
    n_scored = sum(1 for v in per.values() for e in v if e[1] is not None)
    n_all = sum(len(v) for v in per.values())
    if 0 < n_scored < n_all:
        raise DataError(f"{path}: {n_all - n_scored} of {n_all} entries have no 'score'")
    for iid, entries in per.items():
        boxes = _boxes([e[0] for e in entries], f"{path}: image {iid}")
        scores = np.array([e[1] for e in entries], np.float64) if n_scored else None
        segs = [e[2] for e in entries]
        masks = segs if all(isinstance(m, dict) and "counts" in m and "size" in m for m in segs) and segs else None
        images[iid] = RawImage(boxes, scores, masks)
    return ProposalFile(str(path), "coco", images, "xywh", "edges0", has_scores=True)


def _loadmat(path):
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:  # scipy raises this for v7.3 (HDF5) files
        raise DataError(f"{path}: a MATLAB v7.3 (HDF5) file, which scipy.io cannot read: re-save it in Matlab with "
                        "save(..., '-v7')") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # MatReadError, zlib / struct errors of a damaged file: all bad input
        raise DataError(f"{path}: cannot read the .mat file ({type(e).__name__}: {e})") from None


def _cell(mat, key, path) -> list:
    v = mat.get(key)
    if v is None:
        raise DataError(f"{path}: no variable '{key}' (has {sorted(k for k in mat if not k.startswith('__'))})")
    if not isinstance(v, np.ndarray) or v.dtype != object:
        raise DataError(f"{path}: '{key}' must be a cell array (one entry per image)")
    return list(v.reshape(-1))


def _mat_cells(path, mat, with_scores: bool) -> dict:
    ids = [_id(v) for v in _cell(mat, "images", path)]
    boxes = _cell(mat, "boxes", path)
    if len(ids) != len(boxes):
        raise DataError(f"{path}: {len(ids)} images but {len(boxes)} box arrays")
    scores = _cell(mat, "scores", path) if with_scores else [None] * len(ids)
    if len(scores) != len(ids):
        raise DataError(f"{path}: {len(ids)} images but {len(scores)} score arrays")
    images = {}
    for iid, b, s in zip(ids, boxes, scores):
        if iid in images:
            raise DataError(f"{path}: image id {iid!r} listed twice")
        bb = _boxes(b, f"{path}: image {iid}")
        images[iid] = RawImage(bb, _scores(s, len(bb), f"{path}: image {iid}"))
    return images


def read_rcnn_mat(path) -> ProposalFile:
    mat = _loadmat(path)
    return ProposalFile(str(path), "rcnn_mat", _mat_cells(path, mat, False), "yxyx", "pixels1", has_scores=False)


def read_hosang_mat(path) -> ProposalFile:
    path = Path(path)
    if path.is_file():
        mat = _loadmat(path)
        if isinstance(mat.get("boxes"), np.ndarray) and mat["boxes"].dtype == object:
            images = _mat_cells(path, mat, "scores" in mat)
            return ProposalFile(str(path), "hosang_mat", images, "xyxy", "pixels1")
        files = [path]
    else:
        files = sorted(path.rglob("*.mat"))
        if not files:
            raise DataError(f"{path}: no .mat files in this folder (hosang_mat: one <image_id>.mat per image)")
    images, scored = {}, 0
    for f in files:
        mat = _loadmat(f)
        if "boxes" not in mat:
            raise DataError(f"{f}: no variable 'boxes'")
        iid = f.stem
        if iid in images:
            raise DataError(f"{path}: two files for image {iid!r}")
        b = _boxes(mat["boxes"], str(f))
        s = _scores(mat.get("scores"), len(b), str(f))
        scored += s is not None
        images[iid] = RawImage(b, s)
    if 0 < scored < len(images):
        raise DataError(f"{path}: {len(images) - scored} of {len(images)} files have no 'scores'")
    return ProposalFile(str(path), "hosang_mat", images, "xyxy", "pixels1")


def read_detectron2(path, obj) -> ProposalFile:
    for k in ("ids", "boxes"):
        if k not in obj:
            raise DataError(f"{path}: a detectron2 proposal file needs '{k}' (has {sorted(map(str, obj))})")
    ids, boxes = list(obj["ids"]), list(obj["boxes"])
    logits = obj.get("objectness_logits", obj.get("scores"))
    logits = list(logits) if logits is not None else [None] * len(ids)
    if not (len(ids) == len(boxes) == len(logits)):
        raise DataError(f"{path}: {len(ids)} ids, {len(boxes)} box arrays and {len(logits)} logit arrays")
    mode = obj.get("bbox_mode", BoxMode.XYXY_ABS)
    try:
        mode = BoxMode(int(mode))
    except (TypeError, ValueError):
        raise DataError(f"{path}: unknown bbox_mode {mode!r}") from None
    if mode == BoxMode.XYWHA_ABS:
        raise DataError(f"{path}: rotated boxes (bbox_mode XYWHA_ABS) cannot be proposals here")
    images = {}
    for iid, b, s in zip(ids, boxes, logits):
        iid = _id(iid)
        if iid in images:
            raise DataError(f"{path}: image id {iid!r} listed twice")
        bb = _boxes(b, f"{path}: image {iid}")
        images[iid] = RawImage(bb, _scores(s, len(bb), f"{path}: image {iid}"))
    layout = "xywh" if mode in (BoxMode.XYWH_ABS, BoxMode.XYWH_REL) else "xyxy"
    pf = ProposalFile(str(path), "detectron2", images, layout, "edges0")
    pf.rel_mode = mode in (BoxMode.XYXY_REL, BoxMode.XYWH_REL)
    return pf


def read_mmdet(path, obj, split_ids: list[str]) -> ProposalFile:
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path}: an mmdetection proposal file is a list of per-image arrays")
    images, has_scores = {}, None
    for k, a in enumerate(obj):
        if isinstance(a, (list, tuple)) and len(a) == 1:  # [array] per image (one 'class')
            a = a[0]
        a = np.asarray(a, dtype=np.float64) if not isinstance(a, np.ndarray) else a.astype(np.float64)
        if a.size == 0:
            a = a.reshape(0, 5 if has_scores in (None, True) else 4)
        if a.ndim != 2 or a.shape[1] not in (4, 5):
            raise DataError(f"{path}: entry {k}: expected an (n, 5) array x1 y1 x2 y2 score, got {a.shape}")
        if has_scores is None and len(a):
            has_scores = a.shape[1] == 5
        if k >= len(split_ids):
            continue
        where = f"{path}: entry {k} (image {split_ids[k]})"
        bb = _boxes(a[:, :4], where)
        images[split_ids[k]] = RawImage(bb, _scores(a[:, 4], len(bb), where) if a.shape[1] == 5 else None)
    pf = ProposalFile(str(path), "mmdet", images, "xyxy", "edges0", positional=True,
                      extra_entries=max(0, len(obj) - len(split_ids)))
    pf.notes.append(f"mmdet entries are matched to the split by position ({len(obj)} entries, "
                    f"{len(split_ids)} images in the split)")
    return pf


def read_npz(path) -> ProposalFile:
    try:
        z = np.load(str(path), allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e}; object arrays are not "
                        "read: store image ids as a string array)") from None
    with z:
        keys = set(z.files)
        if "image_ids" not in keys:
            raise DataError(f"{path}: no 'image_ids' array (has {sorted(keys)})")
        ids = [_id(v) for v in z["image_ids"].reshape(-1)]
        images = {}
        if "boxes" in keys:
            if "counts" not in keys:
                raise DataError(f"{path}: concatenated 'boxes' need 'counts' (boxes per image)")
            boxes = _boxes(z["boxes"], f"{path}: boxes")
            counts = np.asarray(z["counts"]).reshape(-1).astype(np.int64)
            if len(counts) != len(ids) or counts.min(initial=0) < 0 or counts.sum() != len(boxes):
                raise DataError(f"{path}: 'counts' ({len(counts)} values, sum {counts.sum()}) does not match "
                                f"{len(ids)} image ids and {len(boxes)} boxes")
            scores = _scores(z["scores"], len(boxes), f"{path}: scores") if "scores" in keys else None
            off = np.concatenate([[0], np.cumsum(counts)])
            for k, iid in enumerate(ids):
                if iid in images:
                    raise DataError(f"{path}: image id {iid!r} listed twice")
                images[iid] = RawImage(boxes[off[k]:off[k + 1]],
                                       None if scores is None else scores[off[k]:off[k + 1]])
        else:
            for k, iid in enumerate(ids):
                if f"boxes_{k}" not in keys:
                    raise DataError(f"{path}: no 'boxes' and no 'boxes_{k}' for image {iid!r}")
                if iid in images:
                    raise DataError(f"{path}: image id {iid!r} listed twice")
                b = _boxes(z[f"boxes_{k}"], f"{path}: boxes_{k}")
                s = _scores(z[f"scores_{k}"], len(b), f"{path}: scores_{k}") if f"scores_{k}" in keys else None
                images[iid] = RawImage(b, s)
    return ProposalFile(str(path), "npz", images, "xyxy", "edges0")


def detect_format(path, trust_pickle: bool = False) -> str:
    """The format of a file from its name and, for .mat and pickles, its content."""
    path = Path(path)
    if path.is_dir():
        return "hosang_mat"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suf = path.suffix.lower()
    if suf == ".json":
        return "coco"
    if suf == ".npz":
        return "npz"
    if suf == ".mat":
        mat = _loadmat(path)
        b = mat.get("boxes")
        if isinstance(b, np.ndarray) and b.dtype == object and "scores" not in mat:
            return "rcnn_mat"
        return "hosang_mat"
    if suf in PICKLE_SUFFIXES:
        obj = load_pickle(path, trust_pickle)
        if isinstance(obj, dict):
            return "detectron2"
        if isinstance(obj, (list, tuple)):
            return "mmdet"
        raise DataError(f"{path}: a pickle of a {type(obj).__name__}, neither a detectron2 dict nor an mmdet list")
    raise DataError(f"{path}: cannot tell the format from the name: pass --format ({', '.join(FORMATS)})")


def read_proposal_file(path, fmt: str = "auto", split_ids: list[str] | None = None,
                       trust_pickle: bool = False) -> ProposalFile:
    """Read a proposal file of format `fmt` ('auto': from its name / content). `split_ids`: the split's image ids
    in order, needed by mmdet (positional) files."""
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path, trust_pickle)
        log.info("%s: format %s", path, fmt)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (choose one of auto, {', '.join(FORMATS)})")
    if fmt != "hosang_mat" and not path.is_file():
        raise DataError(f"{path}: file not found" + (" (a folder is read as hosang_mat)" if path.is_dir() else ""))
    if fmt == "coco":
        return read_coco(path)
    if fmt == "rcnn_mat":
        return read_rcnn_mat(path)
    if fmt == "hosang_mat":
        if not path.exists():
            raise DataError(f"{path}: file or folder not found")
        return read_hosang_mat(path)
    if fmt == "npz":
        return read_npz(path)
    obj = load_pickle(path, trust_pickle)
    if fmt == "detectron2":
        if not isinstance(obj, dict):
            raise DataError(f"{path}: a detectron2 proposal file is a dict, got a {type(obj).__name__}")
        return read_detectron2(path, obj)
    if split_ids is None:
        raise DataError("mmdet files are matched to a split by position: the split's image ids are needed")
    return read_mmdet(path, obj, split_ids)
