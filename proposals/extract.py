"""Proposal extraction over a dataset into a `ProposalStore`, in parallel worker processes, resumable.

Each worker process builds its proposer once (model weights, OpenCV objects) and then only receives image paths;
the parent process is the only writer of the store (one atomic file per image), so an interrupted or failed run
keeps every finished image and the next run computes only the missing ones.

Under ``torchrun`` (core/distributed.py) :func:`extract_proposals` shards the images over the ranks
(``DistributedSampler(shuffle=False)`` split: rank r takes images r, r+W, ..., padded to equal shares): each rank
fills its own shard store ``<out>.shards/<r>-of-<W>`` (resumable like any store), then rank 0 merges the shards
into ``<out>`` in the split's order with :func:`core.store.merge_stores` (padding duplicates keep the first copy)
and removes them -- the store is the one a single process writes. With ``device: cuda`` rank r uses GPU LOCAL_RANK.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.errors import DataError, ImageError, UserError, is_out_of_memory

log = logging.getLogger(__name__)

_PROPOSER = None  # the worker process's proposer, built once by _init_worker


def _limit_threads() -> None:
    """One thread per worker process: the processes are the parallelism."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)


def _init_worker(factory) -> None:
    global _PROPOSER
    # before any import that starts a thread pool (torch reads OMP_NUM_THREADS when it is imported); torch itself
    # is only imported by proposers that need it (DeepMask), not by SelectiveSearch workers
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    _limit_threads()
    _PROPOSER = factory()
    _limit_threads()  # torch.set_num_threads(1) / cv2.setNumThreads(1) for what the factory imported


def _memory_hint(proposer) -> str:
    """The setting that bounds a proposer's memory per image."""
    dm = getattr(proposer, "dm", None)
    if dm is not None:  # DeepMask: the image is downscaled to max_image_side first; scale_batch pads all scales
        hint = f"lower deepmask.max_image_side (now {dm.max_image_side}; 0 = no cap)"
        return hint + (", or set deepmask.scale_batch=false" if getattr(dm, "scale_batch", False) else "")
    return "selective search needs memory in proportion to the image size: downscale the image"


def _propose_one(proposer, image_id: str, path: str, top: int | None):
    """(image_id, boxes, scores, masks, error message or None); user errors come back as messages."""
    from core.images import load_image

    image = None
    try:
        image = load_image(path)
        boxes, scores, masks = proposer(image)
    except UserError as e:
        return image_id, None, None, None, str(e)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        size = f"{image.shape[1]}x{image.shape[0]} px, " if image is not None else ""
        return image_id, None, None, None, f"image {image_id} ({size}{path}): out of memory ({type(e).__name__}); " \
                                           f"{_memory_hint(proposer)}"
    if top is not None:
        boxes, scores = boxes[:top], scores[:top]
        masks = masks[:top] if masks is not None else None
    return image_id, np.asarray(boxes, np.float32), np.asarray(scores, np.float32), masks, None


def _work(item):
    image_id, path, top = item
    return _propose_one(_PROPOSER, image_id, path, top)


def run_extraction(dataset, proposer_factory, store, *, workers: int = 1, top: int | None = None,
                   progress: bool = True) -> dict:
    """Compute the proposals of every image of `store` that has none yet; returns counts and timing.

    proposer_factory: a picklable zero-argument callable returning a proposer (built once per worker process).
    A missing/corrupt image (or a broken annotation needed to find it) does not stop the others: it is logged,
    and after the loop a `ImageError`/`DataError` names the first failing file; finished images stay in the store.
    """
    todo = [i for i in store.image_ids if not store.done(i)]
    n_total = len(store.image_ids)
    if not todo:
        log.info("%s: all %d images already have proposals", store.path, n_total)
        return {"computed": 0, "skipped": n_total, "failed": 0, "seconds": 0.0}
    log.info("%s: %d of %d images to compute (%d already done), %d worker(s)", store.path, len(todo), n_total,
             n_total - len(todo), workers)
    failures: list[tuple[str, str, type]] = []
    items = []
    for i in todo:
        try:
            items.append((i, dataset.get(i).path, top))
        except DataError as e:
            failures.append((i, str(e), type(e)))
    bar = tqdm(total=n_total, initial=n_total - len(todo), unit="img", desc="proposals", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    computed = 0

    def handle(result):
        nonlocal computed
        image_id, boxes, scores, masks, err = result
        if err is not None:
            failures.append((image_id, err, ImageError))
            log.error("image %s: %s", image_id, err)
        else:
            store.put(image_id, boxes, scores, masks)
            computed += 1
        bar.update(1)
        bar.set_postfix_str(f"{computed / max(time.perf_counter() - t0, 1e-9):.2f} images/s", refresh=False)

    try:
        if workers <= 1 or len(items) <= 1:
            proposer = proposer_factory()
            for image_id, path, tp in items:
                handle(_propose_one(proposer, image_id, path, tp))
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold torch/OpenMP threads
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx,
                                        initializer=_init_worker, initargs=(proposer_factory,)) as pool:
                pending: set = set()
                it = iter(items)
                try:
                    for item in it:  # keep at most 2 images per worker in flight
                        pending.add(pool.submit(_work, item))
                        if len(pending) >= 2 * workers:
                            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                            for f in done:
                                handle(f.result())
                    for f in cf.as_completed(pending):
                        handle(f.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    secs = time.perf_counter() - t0
    log.info("%s: computed %d images in %.1f s (%.2f images/s)", store.path, computed, secs,
             computed / max(secs, 1e-9))
    if failures:
        image_id, msg, kind = failures[0]
        more = f" (and {len(failures) - 1} more images failed; see the log)" if len(failures) > 1 else ""
        cls = kind if issubclass(kind, UserError) else ImageError
        raise cls(f"{msg}{more}; the {computed + n_total - len(todo)} finished images are kept in {store.path}, "
                  "rerun to resume")
    return {"computed": computed, "skipped": n_total - len(todo), "failed": 0, "seconds": secs}


def extract_proposals(cfg, method: str, dataset, out, *, checkpoint: str | None = None, workers: int = 1,
                      image_ids: list[str] | None = None, progress: bool = True):
    """Proposals of `method` for `dataset` (or its `image_ids`) into the store at `out`; resumes; returns the store.

    The store is identified by (method, `proposer_params`, dataset, split, image ids): rerunning with the same
    ones resumes, other ones are an error naming the store. The resolved config is written to `out/config.yaml`.
    """
    from core import distributed
    from core.config import save_config
    from core.store import ProposalStore

    from . import build_proposer, method_has_masks, proposer_params

    ids = list(dataset.image_ids if image_ids is None else image_ids)
    if not ids:
        raise DataError("no images to compute proposals for")
    if distributed.init() and not _IN_SHARD[0]:
        return _extract_sharded(cfg, method, dataset, out, checkpoint, workers, ids, progress)
    proposer_factory = functools.partial(build_proposer, method, cfg, checkpoint)
    info = getattr(proposer_factory(), "info", None)  # checks the settings once here, before any worker starts
    store = ProposalStore.create(out, method=method, params=proposer_params(method, cfg, checkpoint),
                                 dataset=dataset.name, split=dataset.split, image_ids=ids,
                                 has_masks=method_has_masks(method))
    if info:
        store.set_info(info)
    save_config(cfg, Path(out) / "config.yaml")
    run_extraction(dataset, proposer_factory, store, workers=workers, progress=progress)
    store.finalize()
    return store


_IN_SHARD = [False]  # set while a rank extracts its own shard (no further sharding)


def _extract_sharded(cfg, method, dataset, out, checkpoint, workers, ids, progress):
    """extract_proposals under torchrun: one shard store per rank, merged by rank 0 (module docstring)."""
    import dataclasses
    import shutil

    from core import distributed
    from core.config import save_config
    from core.store import ProposalStore, merge_stores

    from . import method_has_masks, proposer_params

    out = Path(out)
    rank, world = distributed.rank(), distributed.world_size()
    done = None
    if distributed.is_main():  # a finished store for the same identity is reused (or a different one refused)
        store = ProposalStore.create(out, method=method, params=proposer_params(method, cfg, checkpoint),
                                     dataset=dataset.name, split=dataset.split, image_ids=ids,
                                     has_masks=method_has_masks(method))
        done = bool(store.meta.get("complete"))
    if distributed.broadcast_object(done):
        log.info("%s: all %d images already have proposals", out, len(ids))
        return ProposalStore.open(out)
    shard_root = out.with_name(out.name + ".shards")
    if distributed.is_main() and shard_root.is_dir():  # shards of another config or world size: start them over
        _remove_stale_shards(shard_root, world, {"method": method, "params": proposer_params(method, cfg, checkpoint),
                                                 "dataset": dataset.name, "split": dataset.split})
    distributed.barrier()
    mine = list(dict.fromkeys(ids[k] for k in distributed.shard_indices(len(ids), rank, world)))
    dev = str(distributed.device(cfg.device))
    cfg_rank = dataclasses.replace(cfg, device=dev) if dev != cfg.device else cfg
    _IN_SHARD[0] = True
    try:
        extract_proposals(cfg_rank, method, dataset, shard_root / f"{rank}-of-{world}", checkpoint=checkpoint,
                          workers=workers, image_ids=mine, progress=progress and distributed.is_main())
    finally:
        _IN_SHARD[0] = False
    distributed.barrier()  # every shard is finished
    if distributed.is_main():
        merge_stores([shard_root / f"{r}-of-{world}" for r in range(world)], out, image_ids=ids)
        save_config(cfg, out / "config.yaml")
        shutil.rmtree(shard_root, ignore_errors=True)
        log.info("%s: merged %d shards (%d images)", out, world, len(ids))
    distributed.barrier()
    return ProposalStore.open(out)


def _remove_stale_shards(shard_root: Path, world: int, identity: dict) -> None:
    import json
    import shutil

    from core.io import read_json

    identity = json.loads(json.dumps(identity))  # as stored in meta.json
    for d in shard_root.iterdir():
        meta = d / "meta.json"
        stale = not d.name.endswith(f"-of-{world}") or not meta.is_file()
        if not stale:
            old = read_json(meta)
            stale = any(old.get(k) != v for k, v in identity.items())
        if stale:
            log.info("%s: removing a shard store of another configuration or number of processes", d)
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)


def export_coco_results(store, path, top: int | None = None) -> int:
    """Write the store as a COCO results json: a list of {image_id, bbox [x,y,w,h], score[, segmentation]}.

    image_id is the int id for a COCO dataset and the string id (file stem) for VOC. Returns the number of entries.
    """
    from core.io import write_json

    coco = str(store.meta.get("dataset", "")).startswith("coco:")
    out = []
    for image_id in store.image_ids:
        p = store.get(image_id, top=top)
        iid = int(image_id) if coco else image_id
        xywh = np.concatenate([p.boxes[:, :2], p.boxes[:, 2:] - p.boxes[:, :2]], axis=1).round(2).tolist()
        scores = p.scores.astype(np.float64).round(6).tolist()
        for k in range(len(p.boxes)):
            d = {"image_id": iid, "bbox": xywh[k], "score": scores[k]}
            if p.masks is not None:
                d["segmentation"] = p.masks[k]
            out.append(d)
    write_json(path, out)
    log.info("wrote %d proposals of %d images to %s", len(out), len(store.image_ids), path)
    return len(out)
