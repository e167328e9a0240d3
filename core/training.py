"""The training driver both trainings (DeepMask, Fast R-CNN) run on.

A training is a folder and a loop. :class:`Training` owns what they have in common: the seeds (from the config, then
per rank), the process group and device, the learning-rate multiplier of ``lr_scaling``, the checkpoints
(:class:`CheckpointFiles`: save, resume with an identity check, keep the newest, keep the best by validation), the
history written beside them, the progress bar, and the guards that stop a diverging run before it overwrites a good
checkpoint. :class:`TrainStep` is one SGD iteration (forward and loss, the non-finite guard, backward, update); the
benchmark times that same object. What differs between the two trainings comes in as plain callables: the model's
loss on a batch, what to log after a step, how to validate, what else a checkpoint holds.

Exact resumption: a checkpoint holds the model, optimizer (and scheduler) states, the iteration, the history and
the RNG states of every rank; the data streams are pure functions of (seed, position) and are rebuilt by the
caller from the iteration, so a resumed run gives the numbers of an uninterrupted one.

Under ``torchrun`` (core/distributed.py) every rank runs the same loop on its share of each global batch; rank 0
alone validates and writes (checkpoints, history, final files), the others wait at a barrier. Checkpoints of a
distributed run also hold every rank's RNG state, the world size and the replicas' state hashes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .backbones import upgrade_state_dict
from .config import save_config, to_dict
from .errors import CheckpointError, DataError
from .io import atomic_torch_save, load_checkpoint, write_json

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators from the config's seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point weight or buffer of ``model`` holding NaN or infinity, else None."""
    return next((n for n, w in model.state_dict().items() if w.is_floating_point() and not w.isfinite().all()), None)


def identity_mismatch(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key (old value, now new value)' for every dotted key whose value differs between two (nested) identity
    dicts, sorted by key."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_mismatch(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r}, now {b!r})")
    return out


def check_identity(path, old: dict, new: dict) -> None:
    """CheckpointError naming every differing setting when the checkpoint at ``path`` was trained with another
    identity than the run resuming it."""
    diff = identity_mismatch(old, new)
    if diff:
        raise CheckpointError(f"{path}: was trained with a different {', '.join(diff)}; use another output folder "
                              "(--out) to train anew")


def worker_init(_) -> None:
    """DataLoader workers run one thread each (the workers are the parallelism)."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_loader(dataset, workers: int, seed: int, *, single_threaded_workers: bool = True, **kwargs):
    """A DataLoader over ``dataset`` with ``workers`` spawned worker processes (forking a parent that holds OpenMP
    or OpenCV thread pools can deadlock) and a generator of its own, so that creating it draws nothing from the
    global torch RNG (exact resumption). ``kwargs`` go to DataLoader (batch_size, sampler, collate_fn)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, num_workers=workers,
                      worker_init_fn=worker_init if workers and single_threaded_workers else None,
                      multiprocessing_context="spawn" if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


class CheckpointFiles:
    """The checkpoints of one training folder.

    ``pattern`` holding ``{}`` names one file per checkpointed iteration (``ckpt_{}.pt``), of which only the newest
    is kept (a VGG16 with its momentum is about 1 GB); a fixed name (``last.pt``) is rewritten in place. ``best``:
    the file that also receives a checkpoint whenever the validation metric improves."""

    def __init__(self, out_dir, pattern: str = "ckpt_{}.pt", best: str | None = None):
        self.out_dir = Path(out_dir)
        self.pattern = pattern
        self.best = self.out_dir / best if best else None
        head, _, tail = pattern.partition("{}")
        self._re = re.compile(f"^{re.escape(head)}(\\d+){re.escape(tail)}$") if "{}" in pattern else None

    def path(self, iteration: int) -> Path:
        return self.out_dir / self.pattern.format(iteration)

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.out_dir.is_dir():
            return []
        return [(int(m.group(1)), p) for p in self.out_dir.iterdir() if (m := self._re.match(p.name))]

    def latest(self) -> Path | None:
        """The newest checkpoint in the folder, or None."""
        if self._re is None:
            p = self.out_dir / self.pattern
            return p if p.is_file() else None
        found = self._numbered()
        return max(found)[1] if found else None

    def describe_latest(self) -> str:
        return str(self.latest() or "(none yet)")

    def remove_older(self, iteration: int) -> None:
        if self._re is not None:
            for it, p in self._numbered():
                if it < iteration:
                    p.unlink(missing_ok=True)


class TrainStep:
    """One SGD iteration: ``loss_fn(net, batch) -> (loss, stats)``, the non-finite guard (raised before the update,
    so the checkpoints on disk stay good), backward, optimizer (and scheduler) step. A loss that needs no gradient
    (a batch with nothing to learn from) updates nothing.

    ``guard(batch, iteration)``: a context manager around forward and backward (e.g. naming an out-of-memory
    error); ``diverged(iteration, loss, batch)``: the exception for a non-finite loss; ``autocast``: a low-precision
    dtype for the forward pass (torch.autocast on ``device_type``), None for float32."""

    def __init__(self, net, optimizer, loss_fn, scheduler=None, guard=None, diverged=None,
                 autocast: torch.dtype | None = None, device_type: str = "cpu"):
        self.net, self.optimizer, self.loss_fn, self.scheduler = net, optimizer, loss_fn, scheduler
        self.autocast, self.device_type = autocast, device_type
        self.guard = guard or (lambda batch, it: contextlib.nullcontext())
        self.diverged = diverged or (lambda it, loss, batch: DataError(
            f"training diverged at iteration {it} (loss {loss.item()})"))

    def __call__(self, batch, iteration: int) -> tuple[torch.Tensor, dict]:
        """Run iteration ``iteration`` (0-based: the number done before it) on ``batch``; returns (loss, stats)."""
        with self.guard(batch, iteration + 1):
            with torch.autocast(self.device_type, dtype=self.autocast or torch.bfloat16, enabled=bool(self.autocast)):
                loss, stats = self.loss_fn(self.net, batch)
            loss = loss.float()
            if not torch.isfinite(loss):
                raise self.diverged(iteration + 1, loss, batch)
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss, stats


class Training:
    """One training run of config section ``section`` ('deepmask' or 'detector') in ``checkpoints.out_dir``.

    Creating it joins the process group (under torchrun), picks the device and seeds the global generators from
    ``cfg.seed``; then :meth:`setup` (model and optimizer), :meth:`resume`, :meth:`loop`. ``history_file``: the
    history (a list of dicts) written beside every checkpoint."""

    def __init__(self, cfg, section: str, checkpoints: CheckpointFiles, history_file: str = "history.json",
                 progress: bool = True, desc: str = "train", what: str = "training"):
        self.cfg, self.section = cfg, section
        self.scfg = getattr(cfg, section)
        self.ckpts = checkpoints
        self.out_dir = checkpoints.out_dir
        self.history_file = self.out_dir / history_file
        self.desc, self.what = desc, what
        distributed.init()
        self.device = distributed.device(cfg.device)
        self.main = distributed.is_main()
        self.progress = progress and self.main
        self.lr_mult = distributed.lr_factor(self.scfg.lr_scaling, f"{section}.lr_scaling")
        seed_everything(cfg.seed)
        self.model = self.optimizer = self.scheduler = None
        self.start, self.history, self.best = 0, [], -math.inf

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self, model: torch.nn.Module, make_optimizer: Callable, make_scheduler: Callable | None = None):
        """``model`` (built after the seeding, so every rank starts from the same weights) onto the device, then the
        per-rank seeds (dropout differs between ranks), ``make_optimizer(model, lr_mult)`` and
        ``make_scheduler(optimizer)``."""
        self.model = model.to(self.device)
        distributed.seed_rank_rng(self.cfg.seed)
        self.optimizer = make_optimizer(self.model, self.lr_mult)
        self.scheduler = make_scheduler(self.optimizer) if make_scheduler else None
        return self.model

    def resume(self, check: Callable[[dict, Path], None]) -> dict | None:
        """Continue from the newest checkpoint, if any: ``check(checkpoint, path)`` raises when it belongs to another
        training; then the model, optimizer, scheduler, iteration, history, best metric and RNG states are
        restored. Returns the checkpoint (or None)."""
        path = self.ckpts.latest()
        if path is None:
            return None
        ck = load_checkpoint(path)
        check(ck, path)
        self.model.load_state_dict(upgrade_state_dict(ck["model"]))
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        self.start = int(ck["iteration"])
        self.history = list(ck.get("history", []))
        self.best = float(ck.get("best", -math.inf))
        distributed.set_rng_state(distributed.rank_rng_state(ck.get("rng_ranks"), ck["rng"]))
        log.info("%s: resumed from %s at iteration %d", self.section, path, self.start)
        return ck

    def save_config(self) -> None:
        if self.main:
            save_config(self.cfg, self.out_dir / "config.yaml")

    def wrap(self, find_unused_parameters: bool = False):
        """The model in DistributedDataParallel under torchrun, else the model itself."""
        return distributed.wrap_ddp(self.model, self.device, find_unused_parameters=find_unused_parameters)

    def step(self, net, loss_fn, guard=None, describe: Callable | None = None) -> TrainStep:
        """A :class:`TrainStep` on this run's optimizer and scheduler whose divergence error names the iteration,
        ``describe(batch)``, the learning-rate setting and the last good checkpoint."""
        def diverged(it, loss, batch):
            what = f"{describe(batch)}, " if describe else ""
            return DataError(f"{self.what} diverged at iteration {it} ({what}loss {loss.item()}): "
                             f"{self._advice()}")

        return TrainStep(net, self.optimizer, loss_fn, self.scheduler, guard, diverged, self.train_dtype(),
                         torch.device(self.device).type)

    def train_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``<section>.train_dtype`` (None: float32), logged once."""
        from .precision import resolve_dtype

        dtype, name = resolve_dtype(self.scfg.train_dtype, self.device, f"{self.section}.train_dtype")
        log.info("%s: training forward pass in %s", self.what, name)
        return None if dtype == torch.float32 else dtype

    def _advice(self) -> str:
        return (f"lower {self.section}.lr (now {self.scfg.lr:g}); the last good checkpoint "
                f"{self.ckpts.describe_latest()} is kept")

    # ------------------------------------------------------------------------------------------- loop
    def loop(self, batches, step: TrainStep, stop: int, *, before_step=None, after_step=None, validate=None,
             validate_every: int = 0, checkpoint_every: int = 0, state: Callable | None = None) -> int:
        """Iterations ``self.start`` .. ``stop`` over ``batches``; returns the iteration reached.

        Hooks: ``before_step(it, batch)``; ``after_step(it, batch, loss, stats, bar)`` after iteration ``it``
        (1-based count) for logging; ``validate(it)`` (rank 0 only) every ``validate_every`` iterations and at the
        last one, its metrics appended to the history; a checkpoint every ``checkpoint_every`` iterations (0:
        never), after each validation and at ``stop``, holding what ``state(it)`` adds."""
        total = self.scfg.iters
        bar = tqdm(total=total, initial=self.start, desc=self.desc, unit="it", disable=not self.progress,
                   dynamic_ncols=True)
        it = self.start
        for batch in batches:
            if it >= stop:
                break
            if before_step is not None:
                before_step(it, batch)
            loss, stats = step(batch, it)
            it += 1
            if after_step is not None:
                after_step(it, batch, loss, stats, bar)
            bar.update(1)
            metrics = None
            if validate is not None and ((validate_every and it % validate_every == 0) or it == total):
                metrics = self.validate(validate, it)
            if (checkpoint_every and it % checkpoint_every == 0) or it == stop or metrics is not None:
                self.save(it, state(it) if state else {}, metrics)
        bar.close()
        self.start = it
        return it

    def validate(self, fn: Callable[[int], dict], it: int) -> dict:
        """``fn(it)`` on rank 0 (the others wait for its result), with the iteration, appended to the history."""
        metrics = None
        if self.main:
            metrics = dict(fn(it), iteration=it)
        metrics = distributed.broadcast_object(metrics)
        self.history.append(metrics)
        return metrics

    # ------------------------------------------------------------------------------------------- writing
    def save(self, it: int, extra: dict, metrics: dict | None = None, best_key: str = "val_metric") -> Path | None:
        """Checkpoint iteration ``it`` (model, optimizer, scheduler, iteration, config, RNG states, history, best,
        and ``extra``) and the history; also as the best checkpoint when ``metrics[best_key]`` improved (or none is
        written yet). Refused when the weights are no longer finite: the last good checkpoint is kept. Collective
        under torchrun (rank 0 writes)."""
        bad = first_non_finite(self.model)
        if bad is not None:
            raise DataError(f"{self.what} diverged by iteration {it} (non-finite weights in {bad}): {self._advice()}")
        rng_ranks = distributed.all_gather_object(distributed.rng_state())  # None in a single process
        replicas = distributed.replica_check(self.model)
        if not self.main:
            distributed.barrier()
            return None
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "iteration": it,
                "config": to_dict(self.cfg), "rng": distributed.rng_state(), "history": self.history, **extra}
        if self.scheduler is not None:
            ckpt["scheduler"] = self.scheduler.state_dict()
        if rng_ranks is not None:
            ckpt.update(rng_ranks=rng_ranks, world_size=distributed.world_size(), distributed=replicas)
        best = self.ckpts.best
        if best is not None:
            if metrics is not None and (metrics[best_key] > self.best or not best.is_file()):
                self.best = max(self.best, metrics[best_key])
                ckpt["best"] = self.best
                atomic_torch_save(ckpt, best)
                log.info("%s: new best %.4f at iteration %d -> %s", self.section, self.best, it, best)
            ckpt["best"] = self.best
        path = self.ckpts.path(it)
        atomic_torch_save(ckpt, path)
        write_json(self.history_file, self.history, indent=1)
        self.ckpts.remove_older(it)
        distributed.barrier()
        return path

    def write_final(self, path, state: dict) -> None:
        """The finished model: ``state`` (with the replicas' state hashes under torchrun) and the history, written
        by rank 0. Collective."""
        replicas = distributed.replica_check(self.model)  # None in a single process
        if self.main:
            extra = {"distributed": replicas} if replicas is not None else {}
            atomic_torch_save({**state, "history": self.history, **extra}, path)
            write_json(self.history_file, self.history, indent=1)
            log.info("wrote %s", path)
        distributed.barrier()
