"""Object proposals: DeepMask, SelectiveSearch and random boxes (the baseline) behind one interface.

Proposals of other methods are imported (proposals/importing.py, `python -m pipelines.import_proposals`) into
stores whose method is ``imported:<name>`` (`is_imported`, `known_method`): nothing here computes them.

A proposer is a callable `proposer(image HxWx3 uint8 RGB) -> (boxes (n,4) float32 xyxy 0-based, scores (n,) float32,
masks: list[COCO RLE] | None)`, ranked best first, at most `top_n` proposals. `build_proposer(method, cfg,
checkpoint)` makes one; `extract_proposals` runs one over a dataset into a `core.store.ProposalStore`.

This module stays light (no torch / scikit-image at import): worker processes and `proposals.deepmask` import it.
"""
from __future__ import annotations

import os

import numpy as np

from core.errors import ConfigError, UserError

__all__ = ["METHODS", "build_proposer", "proposer_params", "method_has_masks", "rank_scores",
           "SelectiveSearchProposer", "RandomProposer", "random_boxes", "extract_proposals", "run_extraction",
           "export_coco_results", "IMPORTED_PREFIX", "is_imported", "known_method"]

METHODS = ("selective_search", "deepmask", "random")
IMPORTED_PREFIX = "imported:"  # method of a store written by pipelines.import_proposals: imported:<name>


def is_imported(method: str) -> bool:
    """True for ``imported:<name>`` (name: letters, digits, '_', '.', '-'), the method of an imported store."""
    import re

    m = str(method)
    return m.startswith(IMPORTED_PREFIX) and re.fullmatch(r"[A-Za-z0-9_.\-]+", m[len(IMPORTED_PREFIX):]) is not None


def known_method(method: str) -> bool:
    """A method this project computes (METHODS) or an imported one (``imported:<name>``)."""
    return method in METHODS or is_imported(method)


def _not_computed(method: str) -> UserError:
    return UserError(f"method {method!r}: imported proposals are not computed by this project; import the file "
                     "with `python -m pipelines.import_proposals FILE --voc DIR --split S --out STORE` and give "
                     "the store")


def rank_scores(n: int, top_n: int) -> np.ndarray:
    """Scores for a method that only ranks: `1 - rank / top_n` (rank 0 = best).

    SelectiveSearch has no scores (a top-N cut must use its ranking explicitly). These decrease
    strictly with the rank, lie in (0, 1], and are the same for the same rank in every image, so sorting by score
    (COCO AR with maxDets, the detector's top-N reads) reproduces the ranking exactly.
    """
    return (1.0 - np.arange(n, dtype=np.float64) / max(int(top_n), n, 1)).astype(np.float32)


class SelectiveSearchProposer:
    """`selective_search` with the `cfg.ss` settings, capped at `cfg.ss.top_n` (0: uncapped), scores from
    `rank_scores`."""

    has_masks = False

    def __init__(self, ss):
        from .selective_search import BACKENDS, MODES

        if ss.backend not in BACKENDS:
            raise ConfigError(f"config key 'ss.backend': unknown backend {ss.backend!r} (choose one of "
                              f"{', '.join(BACKENDS)})")
        if ss.mode not in MODES:
            raise ConfigError(f"config key 'ss.mode': unknown mode {ss.mode!r} (choose one of {', '.join(MODES)})")
        if ss.top_n < 0:
            raise ConfigError(f"config key 'ss.top_n': must be >= 0 (0 = every box), got {ss.top_n}")
        if ss.min_box < 0:
            raise ConfigError(f"config key 'ss.min_box': must be >= 0, got {ss.min_box}")
        if ss.backend == "opencv":  # fail now, not on the first image in a worker
            try:
                import cv2

                cv2.ximgproc.segmentation.createSelectiveSearchSegmentation  # noqa: B018
            except (ImportError, AttributeError):
                raise UserError("config key 'ss.backend' is 'opencv' but opencv-contrib (cv2.ximgproc) is not "
                                "installed: pip install opencv-contrib-python-headless, or use 'skimage'") from None
        self.ss = ss

    def __call__(self, image: np.ndarray):
        from .selective_search import selective_search

        ss = self.ss
        boxes = selective_search(image, mode=ss.mode, seed=ss.seed, min_box=ss.min_box, backend=ss.backend)
        boxes = boxes[: ss.top_n or None]  # 0: every box, as Fast R-CNN used them (about 2k per VOC image)
        return boxes, rank_scores(len(boxes), ss.top_n), None


def random_boxes(h: int, w: int, n: int, seed: int, min_side: float = 16.0) -> np.ndarray:
    """``n`` boxes inside an h x w image, float32 xyxy: sides log-uniform from ``min_side`` to the image's side,
    centres uniform, clipped to the image (at least 1 px)."""
    import math

    rng = np.random.default_rng(seed)
    bw = np.exp(rng.uniform(math.log(min_side), math.log(max(w, min_side + 1)), n))
    bh = np.exp(rng.uniform(math.log(min_side), math.log(max(h, min_side + 1)), n))
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    b = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
    b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
    return b.astype(np.float32)


class RandomProposer:
    """`cfg.random.top_n` random boxes (random_boxes), the same for the same image pixels and seed; scores from
    `rank_scores`. The floor any proposal method must clear: a detector trained and tested on these learns
    classification from the ground-truth RoIs but has almost nothing to localise with."""

    has_masks = False

    def __init__(self, rnd):
        if rnd.top_n < 1 or rnd.min_side < 1:
            raise ConfigError(f"config keys 'random.top_n' and 'random.min_side': must be >= 1, got {rnd.top_n}, "
                              f"{rnd.min_side}")
        self.rnd = rnd

    def __call__(self, image: np.ndarray):
        import zlib

        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        seed = zlib.crc32(memoryview(image).cast("B")) ^ (int(self.rnd.seed) << 1)
        boxes = random_boxes(h, w, self.rnd.top_n, seed, float(self.rnd.min_side))
        return boxes, rank_scores(len(boxes), self.rnd.top_n), None


def build_proposer(method: str, cfg, checkpoint: str | None = None):
    """A proposer for `method` ('selective_search' | 'deepmask' | 'random') built from the config `cfg`."""
    if method == "selective_search":
        return SelectiveSearchProposer(cfg.ss)
    if method == "random":
        return RandomProposer(cfg.random)
    if method == "deepmask":
        if not checkpoint:
            raise UserError("method 'deepmask' needs a trained checkpoint (--checkpoint PATH)")
        from .deepmask.infer import build_deepmask_proposer

        return build_deepmask_proposer(cfg, checkpoint)
    if is_imported(method):
        raise _not_computed(method)
    raise UserError(f"unknown proposal method {method!r} (choose one of {', '.join(METHODS)})")


def method_has_masks(method: str) -> bool:
    return method == "deepmask"


def checkpoint_fingerprint(path) -> str:
    """SHA-1 of a checkpoint file's bytes (cached per path, size and mtime): a store's identity names the weights
    it came from, not only their path, so a retrained model at the same path is a different store."""
    import hashlib
    import os

    p = os.path.abspath(str(path))
    st = os.stat(p)
    k = (p, st.st_size, st.st_mtime_ns)
    if k not in _FINGERPRINTS:
        h = hashlib.sha1()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FINGERPRINTS[k] = h.hexdigest()[:16]
    return _FINGERPRINTS[k]


_FINGERPRINTS: dict = {}


def proposer_params(method: str, cfg, checkpoint: str | None = None) -> dict:
    """What identifies a method's proposals (stored in the store's meta; a different value is a different store):
    the config fields whose metadata says they affect the method's proposals (core/config.py), so settings that do
    not change them (workers, chunk sizes) are left out and a resumed run may use others."""
    from core.config import DM_INFER, RANDOM, SS, values_for

    def short(tag, section):
        return {k.split(".", 1)[1]: v for k, v in values_for(cfg, tag, section=section).items()}

    if method == "selective_search":
        return {"ss": short(SS, "ss")}
    if method == "random":
        return {"random": short(RANDOM, "random")}
    if method == "deepmask":
        # the network is the checkpoint's (architecture and weights); of the config only the inference settings
        # count -- not the training ones (train_sets, iters, ...), nor scale_batch and chunk (same proposals)
        params = {"deepmask": short(DM_INFER, "deepmask"), "checkpoint": str(checkpoint)}
        if checkpoint and os.path.isfile(str(checkpoint)):
            params["checkpoint_sha1"] = checkpoint_fingerprint(checkpoint)
        return params
    if is_imported(method):
        raise _not_computed(method)
    raise UserError(f"unknown proposal method {method!r} (choose one of {', '.join(METHODS)})")


from .extract import export_coco_results, extract_proposals, run_extraction  # noqa: E402
