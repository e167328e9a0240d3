"""Distributed helpers on PyTorch's own engine (torch.distributed + DistributedDataParallel), for `torchrun`.

Launch any entry point unchanged under ``torchrun --nproc_per_node=N`` (and across machines with ``--nnodes``,
``--rdzv_backend c10d``, ``--rdzv_endpoint HOST:PORT``): the library functions call :func:`init` themselves, which
creates the process group from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Without those variables nothing here does anything: every helper is the identity
or a no-op, and the code runs as a single process exactly as before (same numbers, same files).

Backends (the recipe of torchvision's detection references): gloo for CPU tensors, NCCL for
CUDA tensors (``cpu:gloo,cuda:nccl`` when CUDA is there, so barriers and object collectives stay on the CPU while
DDP's gradient all-reduce runs on NCCL). Each process uses GPU ``LOCAL_RANK`` when the config says ``device: cuda``.

Conventions used by the training loops, extraction and testing (see the README section "Distributed"):

* rank 0 writes checkpoints, logs, validation and merged results; the other ranks wait at a :func:`barrier`.
  Outputs must be on a filesystem every rank sees (multi-node: a shared folder) to resume.
* data: each rank takes every ``world_size``-th sample of the one global stream (rank r: samples r, r+W, r+2W, ...),
  as ``torch.utils.data.DistributedSampler`` does; the global batch is W times the per-process batch.
* learning rate: ``lr_scaling: none`` keeps the configured lr; ``linear`` multiplies it by the world size (Goyal et
  al. 2017, "linear scaling rule"; torchvision's references scale it by hand the same way).
* the global RNG (dropout) is seeded per rank (rank 0 keeps the single-process seed) and every rank's RNG state is
  saved in checkpoints, so a run resumed with the same world size continues exactly.

The environment variable ``DEEPMASK_DIST_TIMEOUT`` (seconds, default 7200) bounds how long a rank waits for the
others at a collective (rank 0 alone may be generating data, validating or evaluating meanwhile).
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)

LR_SCALING = ("none", "linear")
_STATE = {"initialized_here": False}


# ------------------------------------------------------------------------------------------------ process group
def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (torchrun / torch.distributed.run sets these)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init() -> bool:
    """Create the default process group from the environment when launched by torchrun (idempotent).

    Returns True when a process group is up. Non-zero ranks log warnings and errors only (rank 0 tells the story)."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=float(os.environ.get("DEEPMASK_DIST_TIMEOUT", "7200")))
    dist.init_process_group(backend=backend, timeout=timeout)
    _STATE["initialized_here"] = True
    atexit.register(_shutdown)
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("distributed: %d processes (backend %s), this is rank %d", dist.get_world_size(), backend,
             dist.get_rank())
    return True


def _shutdown() -> None:
    if _STATE["initialized_here"] and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # at exit, after a failure on another rank: nothing left to do
            pass


def is_distributed() -> bool:
    """A process group is up (after :func:`init`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if (is_distributed() or launched_by_torchrun()) else 0


def is_main() -> bool:
    return rank() == 0


def device(name: str) -> torch.device:
    """The device of this process for the config's ``device``: 'cuda' (or 'cuda:K') -> GPU LOCAL_RANK under
    torchrun; anything else unchanged."""
    dev = torch.device(name)
    if dev.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return dev


# ------------------------------------------------------------------------------------------------ collectives
def barrier() -> None:
    """Wait for every rank (no-op in a single process). Runs on the CPU backend (gloo)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects; identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only (e.g. generating data); every rank returns its result, the others
    waiting meanwhile. A single process simply calls ``fn``."""
    init()
    return broadcast_object(fn(*args, **kwargs) if is_main() else None)


def all_gather_object(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on every rank; None in a single process."""
    if not is_distributed():
        return None
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_for_logging(values: dict, mean_keys=(), sum_keys=()) -> dict:
    """Values of this rank's minibatch -> the same keys over the global minibatch (means averaged over ranks,
    counts summed); other keys unchanged. In a single process ``values`` itself is returned, untouched."""
    keys = [k for k in (*mean_keys, *sum_keys) if k in values]
    if not is_distributed() or not keys:
        return values
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)  # CPU tensor -> gloo
    out = dict(values)
    w = world_size()
    for k, v in zip(keys, t.tolist()):
        out[k] = v / w if k in mean_keys else (int(v) if isinstance(values[k], int) else v)
    return out


def wrap_ddp(model: torch.nn.Module, dev: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when distributed (parameters broadcast from rank 0, gradients averaged
    over ranks at each backward); the model itself otherwise. Keep using the bare model for attributes,
    state_dict, evaluation and checkpoints."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP does this at the start of each
    forward anyway; doing it before a checkpoint makes every replica equal to the saved one."""
    if not is_distributed():
        return
    for b in model.buffers():  # CPU tensors go through gloo, CUDA tensors through NCCL
        dist.broadcast(b.data, src=0)


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names and bytes) of ``model``."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def replica_check(model: torch.nn.Module) -> dict | None:
    """Collective: after :func:`sync_buffers`, the state hash of every rank's replica. Returns
    {'world_size', 'state_sha256': [per rank], 'identical'} (stored in final checkpoints; logged as an error when
    replicas differ); None in a single process."""
    if not is_distributed():
        return None
    sync_buffers(model)
    hashes = all_gather_object(state_hash(model))
    same = len(set(hashes)) == 1
    if not same and is_main():
        log.error("distributed: the model replicas differ across ranks: %s", hashes)
    return {"world_size": world_size(), "state_sha256": hashes, "identical": same}


# ------------------------------------------------------------------------------------------------ data and lr
def lr_factor(mode: str, key: str) -> float:
    """Learning-rate multiplier for ``<section>.lr_scaling`` = ``mode``: 1 for 'none' (or a single process),
    the world size for 'linear'."""
    if mode not in LR_SCALING:
        raise ConfigError(f"config key '{key}': expected one of {', '.join(LR_SCALING)}, got {mode!r}")
    return float(world_size()) if mode == "linear" else 1.0


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (0 <= I < N) -> (I, N); UserError otherwise."""
    from .errors import UserError

    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def shard_indices(n: int, rank_: int, world: int) -> list[int]:
    """Indices of ``range(n)`` for ``rank_`` of ``world``: every world-th index starting at rank_, padded (by
    wrapping around) to equal length as ``torch.utils.data.DistributedSampler(shuffle=False)`` does, so a few
    indices may belong to two ranks: merges keep the first copy."""
    from torch.utils.data import DistributedSampler

    if n <= 0:
        return []
    return list(iter(DistributedSampler(range(n), num_replicas=world, rank=rank_, shuffle=False)))


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """The global RNG seed of a rank: rank 0 keeps ``seed`` (so one process gives the single-process numbers);
    the others get distinct seeds mixed from (seed, rank)."""
    r = rank() if rank_ is None else rank_
    if r == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7477, r]).generate_state(1, np.uint32)[0])


def seed_rank_rng(seed: int) -> None:
    """Re-seed torch / numpy / random for this rank (no-op on rank 0 and in a single process): dropout masks
    differ between ranks, as they would across the images of one large batch."""
    if rank() == 0:
        return
    import random

    s = rank_seed(seed)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def rank_rng_state(saved_ranks: list | None, saved: dict) -> dict:
    """The RNG state this rank resumes from: its own when the checkpoint holds one per rank of the same world size,
    else the saved (rank 0) state -- then a distributed run does not resume bit-exactly (logged)."""
    if is_distributed():
        if saved_ranks is not None and len(saved_ranks) == world_size():
            return saved_ranks[rank()]
        if is_main():
            log.warning("distributed: the checkpoint was written by %s processes, this run has %d: training "
                        "continues, but not bit-exactly as an uninterrupted run",
                        len(saved_ranks) if saved_ranks is not None else 1, world_size())
    return saved


def rng_state() -> dict:
    """This process's torch / numpy / python (and CUDA) RNG states, for checkpoints that resume exactly.

    Plain data only (tensors, str, int, float, None), so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``: numpy's state in its dict form (``np.random.get_state(legacy=False)``) with the
    key as an int64 tensor, python's ``random.getstate()`` as {'version', 'state' (int64 tensor), 'gauss_next'}."""
    import random

    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(legacy=False), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(st)


def plain_rng_state(st: dict) -> dict:
    """An RNG state of :func:`rng_state` in its plain form, also from the form older checkpoints hold
    (``np.random.get_state()``: a tuple holding an ndarray; ``random.getstate()``: a tuple; numpy arrays as
    key). Plain forms come back equal; keys other than 'numpy' and 'python' are kept as they are."""
    out = dict(st)
    npst = st.get("numpy")
    if isinstance(npst, (tuple, list)):  # legacy tuple: (name, key, pos, has_gauss, cached_gaussian)
        name, key, pos, has_gauss, gauss = npst
        npst = {"bit_generator": name, "state": {"key": key, "pos": pos}, "has_gauss": has_gauss, "gauss": gauss}
    if npst is not None:
        out["numpy"] = {"bit_generator": str(npst["bit_generator"]),
                        "state": {"key": torch.as_tensor(np.asarray(npst["state"]["key"]).astype(np.int64)),
                                  "pos": int(npst["state"]["pos"])},
                        "has_gauss": int(npst["has_gauss"]), "gauss": float(npst["gauss"])}
    py = st.get("python")
    if isinstance(py, (tuple, list)):  # random.getstate(): (version, 625 ints, gauss_next)
        version, internal, gauss_next = py
        py = {"version": version, "state": internal, "gauss_next": gauss_next}
    if py is not None:
        out["python"] = {"version": int(py["version"]), "state": torch.as_tensor(np.asarray(py["state"], np.int64)),
                         "gauss_next": None if py["gauss_next"] is None else float(py["gauss_next"])}
    return out


def set_rng_state(st: dict) -> None:
    """Restore a state of :func:`rng_state` (either form of :func:`plain_rng_state`)."""
    import random

    st = plain_rng_state(st)
    npst = st["numpy"]
    torch.set_rng_state(st["torch"])
    np.random.set_state({"bit_generator": npst["bit_generator"], "has_gauss": npst["has_gauss"], "gauss": npst["gauss"],
                         "state": {"key": npst["state"]["key"].numpy().astype(np.uint32),
                                   "pos": npst["state"]["pos"]}})
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
