"""DeepMask's training data: the mask sets of ``deepmask.train_sets`` / ``val_sets`` as records (COCO instance json
or binary-mask folders, each set's categories its own, each record tagged with its set), the held-out validation
split, and the per-set shares of positives and negative images (``MaskSource.share``)."""
from __future__ import annotations

import logging

import numpy as np

from core.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def load_records(sources, categories=None) -> list:
    """Records (core.datasets.Record) of every image of the given sources (list of MaskSource: COCO instances json or
    binary-mask folders), keeping only objects of ``categories`` (COCO names; ``['pascal']`` = the 20 PASCAL classes,
    DeepMask20) when given. Each record's ``source`` is the index of its set."""
    if categories and list(categories) == ["pascal"]:  # shorthand for DeepMask20 (§4 "Generalization")
        from .model import COCO_PASCAL_CATEGORIES

        categories = list(COCO_PASCAL_CATEGORIES)
    records, label_offset = [], 0  # each source's categories are its own (category-then-instance sampling)
    for k, src in enumerate(sources):
        recs, n_classes = _load_source(src, categories)
        for r in _offset_labels(recs, label_offset):
            r.source = k
        records.extend(recs)
        label_offset += n_classes
    return records


def _load_source(src, categories) -> tuple[list, int]:
    """(records, number of categories) of one MaskSource."""
    from core.datasets import CocoDataset

    masks = src.masks
    if not src.images or bool(src.ann) == bool(masks):
        raise ConfigError("config key 'deepmask.train_sets' / 'deepmask.val_sets': every entry needs 'images' "
                          "(an image folder) and either 'ann' (its COCO instances json) or 'masks' (a folder of "
                          "same-named PNG masks)")
    if masks:
        from core.binary_masks import OBJECTS, BinaryMaskDataset

        if src.objects not in OBJECTS:
            raise ConfigError(f"config key 'deepmask.train_sets': objects must be one of {OBJECTS}, got "
                              f"{src.objects!r} ({masks})")
        if not 0 <= src.min_area < 1:
            raise ConfigError(f"config key 'deepmask.train_sets': min_area is a fraction of the image in "
                              f"[0, 1), got {src.min_area} ({masks})")
        if categories:
            raise ConfigError(f"config key 'deepmask.categories': {masks} is a binary-mask set without "
                              "categories; it cannot be filtered by category")
        ds = BinaryMaskDataset(src.images, masks, src.objects, src.min_area, src.max_images)
        log.info("deepmask data: %d images, %d objects (%s) from %s", len(ds), sum(len(r.boxes) for r in ds.records),
                 src.objects, masks)
        return ds.records, len(ds.classes)
    ds = CocoDataset(src.ann, src.images, list(categories) if categories else None)
    n = len(ds) if src.max_images <= 0 else min(len(ds), src.max_images)
    recs = [ds[i] for i in range(n)]
    if recs and recs[0].segmentations is None:
        raise DataError(f"{src.ann}: no instance masks (DeepMask trains on masks)")
    log.info("deepmask data: %d images, %d objects from %s", len(recs), sum(len(r.boxes) for r in recs), src.ann)
    return recs, len(ds.classes)


def _offset_labels(records: list, offset: int) -> list:
    for r in records:
        r.labels = np.asarray(r.labels, np.int64) + offset
    return records


def split_holdout(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic hold-out of ``fraction`` of the images (at least one when there are two or more)."""
    n = len(records)
    if n < 2 or fraction <= 0:
        return records, []
    k = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng([int(seed), 7]).permutation(n)
    val = set(perm[:k].tolist())
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


class SourceShares:
    """Draws of a source first (by MaskSource.share; the sets without one split the rest by their positives or
    images), then within it as ``positive_sampling`` says."""

    def __init__(self, records: list, sampler, shares):
        sh = np.asarray([float(v) for v in shares], np.float64)
        if np.any(sh < 0) or np.any(sh > 1) or sh.sum() > 1 + 1e-9:
            raise ConfigError(f"config key 'deepmask.train_sets': every share is in [0, 1] and they sum to at most 1, "
                              f"got {[float(v) for v in shares]}")
        n = len(sh)
        pos_src = np.array([records[ri].source for ri in sampler.positives[:, 0]], np.int64)
        img_src = np.array([r.source for r in records], np.int64)
        self.objects = [np.flatnonzero(pos_src == k) for k in range(n)]
        self.images = [np.flatnonzero(img_src == k) for k in range(n)]
        self.categories = [[g for g in sampler._by_category if pos_src[g[0]] == k] for k in range(n)]
        self.image_groups = [[g for g in sampler._by_image if pos_src[g[0]] == k] for k in range(n)]
        self.p_pos = self._probs(sh, np.array([len(g) for g in self.objects], np.float64))
        self.p_img = self._probs(sh, np.array([len(g) for g in self.images], np.float64))
        log.info("deepmask %s data: positives drawn from the sets with probabilities %s", sampler.name,
                 [round(float(v), 3) for v in self.p_pos])

    @staticmethod
    def _probs(sh: np.ndarray, counts: np.ndarray) -> np.ndarray:
        free = (sh == 0) & (counts > 0)
        p = np.where(counts > 0, sh, 0.0)
        if free.any():
            p[free] = max(0.0, 1.0 - sh.sum()) * counts[free] / counts[free].sum()
        if p.sum() <= 0:
            raise DataError("deepmask data: the sets with a share have no usable objects")
        return p / p.sum()

    def groups(self, rng: np.random.Generator):
        k = int(rng.choice(len(self.p_pos), p=self.p_pos))
        return self.categories[k], self.image_groups[k], self.objects[k]

    def image(self, rng: np.random.Generator) -> int:
        k = int(rng.choice(len(self.p_img), p=self.p_img))
        return int(self.images[k][rng.integers(len(self.images[k]))])
