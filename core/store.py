"""The proposal store: ranked proposals per image, on disk, for one (method, dataset, split).

Layout of a store directory::

    STORE/meta.json            method, params, dataset, split, image_ids, format_version, has_masks, complete
    STORE/images/<id>.npz      boxes (n,4) float32 0-based xyxy, scores (n,) float32, ranked best first;
                               with masks: mask_size (2,) int64 (h, w), mask_counts (uint8 bytes of all RLE
                               strings concatenated), mask_offsets (n+1,) int64

One file per image gives random access to any image (and its top N) without reading the others, makes every
write atomic on its own (temporary file + rename) and lets an interrupted extraction resume at the first image
whose file is missing. Shards (for parallel or distributed extraction) are independent stores over disjoint image
subsets, merged with `merge_stores`. Nothing here imports `proposals/`: the detector reads stores with this module.
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

import numpy as np

from .errors import DataError
from .io import atomic_write_bytes, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class Proposals:
    boxes: np.ndarray  # (n,4) float32
    scores: np.ndarray  # (n,) float32
    masks: list[dict] | None = None  # COCO RLE per proposal, or None

    def __len__(self):
        return len(self.boxes)


def _fname(image_id: str) -> str:
    image_id = str(image_id)
    if _SAFE.match(image_id) and not image_id.startswith("."):
        return image_id + ".npz"
    return "h" + sha1(image_id.encode()).hexdigest() + ".npz"


def _validate(image_id, boxes, scores, masks):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if len(scores) != len(boxes):
        raise DataError(f"image {image_id}: {len(boxes)} boxes but {len(scores)} scores")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise DataError(f"image {image_id}: proposals contain NaN or infinite values")
    if masks is not None and len(masks) != len(boxes):
        raise DataError(f"image {image_id}: {len(boxes)} boxes but {len(masks)} masks")
    return boxes, scores


class ProposalStore:
    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.image_ids: list[str] = list(meta["image_ids"])
        self._ids = set(self.image_ids)

    # ------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path, *, method: str, params: dict, dataset: str, split: str, image_ids: list[str],
               has_masks: bool = False, overwrite: bool = False) -> "ProposalStore":
        """Create a store, or reopen an unfinished (or finished) one with the same identity to resume it."""
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION, "method": method, "params": params, "dataset": dataset,
            "split": split, "image_ids": [str(i) for i in image_ids], "has_masks": bool(has_masks),
            "complete": False,
        }
        if len(set(meta["image_ids"])) != len(meta["image_ids"]):
            raise DataError(f"{path}: duplicate image ids given to the proposal store")
        meta_path = path / "meta.json"
        if meta_path.exists():
            old = read_json(meta_path)
            same = all(old.get(k) == meta[k] for k in ("method", "params", "dataset", "split", "image_ids"))
            if same:
                return cls(path, old)
            if not overwrite:
                diff = [k for k in ("method", "params", "dataset", "split", "image_ids") if old.get(k) != meta[k]]
                raise DataError(f"{path}: a proposal store with a different {', '.join(diff)} already exists "
                                "(use another --out, or delete it)")
            shutil.rmtree(path)
        (path / "images").mkdir(parents=True, exist_ok=True)
        write_json(meta_path, meta)
        return cls(path, meta)

    @classmethod
    def open(cls, path, require_complete: bool = True) -> "ProposalStore":
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{path}: not a proposal store (no meta.json)")
        meta = read_json(meta_path)
        for k in ("method", "dataset", "split", "image_ids", "format_version"):
            if k not in meta:
                raise DataError(f"{meta_path}: missing '{k}'")
        if meta["format_version"] != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format version {meta['format_version']}, expected {FORMAT_VERSION}")
        if require_complete and not meta.get("complete"):
            raise DataError(f"{path}: proposal store is incomplete (extraction was interrupted; rerun it)")
        return cls(path, meta)

    # ------------------------------------------------------------------------------------ writing
    def _file(self, image_id) -> Path:
        return self.path / "images" / _fname(image_id)

    def done(self, image_id) -> bool:
        return self._file(image_id).is_file()

    def missing(self) -> list[str]:
        present = set(os.listdir(self.path / "images")) if (self.path / "images").is_dir() else set()
        return [i for i in self.image_ids if _fname(i) not in present]

    def put(self, image_id, boxes, scores, masks: list[dict] | None = None) -> None:
        image_id = str(image_id)
        if image_id not in self._ids:
            raise DataError(f"{self.path}: image id '{image_id}' is not part of this store")
        boxes, scores = _validate(image_id, boxes, scores, masks)
        arrays = {"boxes": boxes, "scores": scores}
        if self.meta.get("has_masks"):
            if masks is None:
                raise DataError(f"{self.path}: image {image_id}: this store needs masks")
            counts = [(m["counts"].encode("ascii") if isinstance(m["counts"], str) else bytes(m["counts"]))
                      for m in masks]
            sizes = {tuple(int(v) for v in m["size"]) for m in masks}
            if len(sizes) > 1:
                raise DataError(f"image {image_id}: masks of different sizes {sorted(sizes)}")
            size = sizes.pop() if sizes else (0, 0)
            arrays["mask_size"] = np.array(size, np.int64)
            arrays["mask_offsets"] = np.cumsum([0] + [len(c) for c in counts]).astype(np.int64)
            arrays["mask_counts"] = np.frombuffer(b"".join(counts), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self._file(image_id), buf.getvalue())

    def finalize(self) -> None:
        missing = self.missing()
        if missing:
            raise DataError(f"{self.path}: {len(missing)} images have no proposals yet (first: {missing[0]})")
        self.meta["complete"] = True
        write_json(self.path / "meta.json", self.meta)

    # ------------------------------------------------------------------------------------ reading
    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def has_masks(self) -> bool:
        return bool(self.meta.get("has_masks"))

    def check(self, dataset_name: str, split: str) -> None:
        """DataError when this store was made for another dataset or split."""
        if self.meta["dataset"] != dataset_name or self.meta["split"] != split:
            raise DataError(f"{self.path}: proposals are for {self.meta['dataset']} split '{self.meta['split']}', "
                            f"not {dataset_name} split '{split}'")

    def get(self, image_id, top: int | None = None, masks: bool = True) -> Proposals:
        image_id = str(image_id)
        if image_id not in self._ids:
            raise DataError(f"{self.path}: no proposals for image id '{image_id}' in this store")
        f = self._file(image_id)
        if not f.is_file():
            raise DataError(f"{self.path}: proposals of image '{image_id}' are missing")
        try:
            with np.load(f) as z:
                boxes = z["boxes"][:top]
                scores = z["scores"][:top]
                rles = None
                if masks and "mask_counts" in z.files:
                    off = z["mask_offsets"]
                    n = len(boxes)
                    blob = z["mask_counts"][: off[n]].tobytes()
                    h, w = (int(v) for v in z["mask_size"])
                    rles = [{"size": [h, w], "counts": blob[off[i]:off[i + 1]].decode("ascii")} for i in range(n)]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated or foreign file
            raise DataError(f"{f}: corrupt proposal file of image '{image_id}' ({type(e).__name__}: {e})") from None
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise DataError(f"{f}: proposals of image '{image_id}' contain NaN or infinite values")
        return Proposals(boxes.astype(np.float32, copy=False), scores.astype(np.float32, copy=False), rles)

    def set_info(self, info: dict) -> None:
        """Record facts about how the proposals were made (e.g. DeepMask's covered object sizes) in meta.json's
        'info'; not part of the store's identity."""
        self.meta["info"] = dict(info)
        write_json(self.path / "meta.json", self.meta)

    def fingerprints(self, tops, image_ids=None) -> list[str]:
        """For each N of `tops` (None: all), the SHA-1 of the top N boxes of every image (of `image_ids`, default
        all, in that order): what a detector trained on this store with N proposals reads. Same boxes, same
        fingerprint, whatever the settings that made them (a larger top_n of a ranked method keeps its first
        boxes). One read of the store serves every N."""
        import hashlib

        tops = list(tops)
        hashes = [hashlib.sha1() for _ in tops]
        for i in (self.image_ids if image_ids is None else image_ids):
            boxes = np.ascontiguousarray(self.get(i, masks=False).boxes, dtype=np.float32)
            for h, top in zip(hashes, tops):
                h.update(str(i).encode() + b"\0")
                h.update(boxes[:top].tobytes())
        return [h.hexdigest()[:16] for h in hashes]

    def __len__(self):
        return len(self.image_ids)


def merge_stores(shard_paths, out_path, image_ids: list[str] | None = None) -> ProposalStore:
    """Merge finished shards into one store (image order: `image_ids` if given, else order of appearance)."""
    shards = [ProposalStore.open(p) for p in shard_paths]
    if not shards:
        raise DataError("merge_stores: no shards given")
    ref = shards[0].meta
    for s in shards[1:]:
        for k in ("method", "params", "dataset", "split", "has_masks"):
            if s.meta.get(k) != ref.get(k):
                raise DataError(f"{s.path}: shard differs from {shards[0].path} in '{k}'")
    owner: dict[str, ProposalStore] = {}
    for s in shards:
        for i in s.image_ids:
            owner.setdefault(i, s)  # duplicates (sampler padding) keep the first shard's copy
    ids = list(image_ids) if image_ids is not None else list(owner)
    missing = [i for i in ids if i not in owner]
    if missing:
        raise DataError(f"merge: {len(missing)} images are in no shard (first: {missing[0]})")
    out = ProposalStore.create(out_path, method=ref["method"], params=ref["params"], dataset=ref["dataset"],
                               split=ref["split"], image_ids=ids, has_masks=ref.get("has_masks", False))
    if ref.get("info"):
        out.set_info(ref["info"])
    for i in ids:
        dst = out._file(i)
        if not dst.exists():
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(owner[i]._file(i), tmp)
            os.replace(tmp, dst)
    out.finalize()
    return out
