"""Atomic file writes and safe reads.

Every file the project writes goes through a temporary file in the same directory followed by
`os.replace`, so a killed process never leaves a half-written file that a later run reads as complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError, DataError


def _atomic(path: str | os.PathLike, writer: Callable[[Any], None], mode: str,
            check: Callable[[str], None] | None = None) -> None:
    """``writer(f)`` into a temporary file beside ``path``, then ``check(temporary path)`` (it may raise), then
    the rename; on any failure ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data), "wb")


def atomic_write_text(path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def write_json(path, obj, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


# ------------------------------------------------------------------------------------------------ checkpoints
# Checkpoints are data, not code: they hold tensors and plain containers of str / numbers / bools / None only and
# are read with torch.load(weights_only=True), whose unpickler refuses anything else before it is imported or called.
# Checkpoints of earlier versions hold numpy RNG states; `python -m pipelines.convert_checkpoint` rewrites them.
CONVERT_HINT = "python -m pipelines.convert_checkpoint"


def _numpy_data_globals() -> dict:
    """{pickled name: object} for numpy arrays and scalars of numeric dtypes, the only non-plain content of
    checkpoints written by earlier versions (RNG states). Rebuilding these copies bytes into an array; nothing is
    called that the pickle chooses. Both names of numpy's multiarray module (numpy 1.x and 2.x) are listed."""
    import numpy as np

    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
    out = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = reconstruct
        out[f"{mod}.scalar"] = scalar
    for code in "?bBhHiIlLqQefdgFDG":  # bool, integers, floats, complex: the dtype classes numpy >= 1.25 pickles
        cls = type(np.dtype(code))
        out[f"{cls.__module__}.{cls.__name__}"] = cls
    return out


def _unsafe_globals(path) -> list[str] | None:
    """What a torch file would import or call beyond plain data (read from the pickle's opcodes, nothing is run);
    None when the file cannot be scanned (not a torch zip file, damaged, unusual opcodes)."""
    import torch

    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return None


def _why_not_loaded(path, exc: Exception, what: str) -> str:
    """One line saying why ``path`` did not load with weights_only=True: refused content (naming what it would
    import or call; an old-format checkpoint: how to convert it) or a corrupt / truncated file."""
    import pickle
    import re

    unsafe = _unsafe_globals(path)
    if not unsafe and isinstance(exc, pickle.UnpicklingError):  # not scanned (legacy non-zip format): torch's
        unsafe = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))  # message names the first global refused
    if unsafe:
        names = ", ".join(f"`{g}`" for g in unsafe)
        if set(unsafe) <= set(_numpy_data_globals()):
            return (f"{path}: refused: not plain data (it holds numpy objects {names}, as a {what} of an earlier "
                    f"version of this project does in its RNG state); convert it with `{CONVERT_HINT} {path}` "
                    "(safe: it reads numpy arrays and nothing else)")
        return (f"{path}: refused: not plain data (it would import/call {names}); nothing of it was run. "
                f"A {what} of this project holds tensors and plain containers only")
    return f"{path}: cannot read {what} (corrupt or truncated file? {_reason(exc)})"


def _reason(exc: Exception) -> str:
    """'<type>: <first sentence of torch's reason>' (torch wraps the reason in paragraphs of general advice)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {detail[:300]}"


def atomic_torch_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` atomically. ``obj`` must be plain data (tensors, containers, str / numbers /
    bools / None): anything torch.load(weights_only=True) would refuse raises TypeError and ``path`` is left as
    it was."""
    import torch

    def check(tmp):
        unsafe = _unsafe_globals(tmp)
        if unsafe:
            raise TypeError(f"{path}: not written: the object holds {', '.join(unsafe)}, which would not load with "
                            "torch.load(weights_only=True); save tensors and plain containers only")

    _atomic(path, lambda f: torch.save(obj, f), "wb", check)


def load_checkpoint(path, map_location="cpu", what: str = "checkpoint") -> dict:
    """A checkpoint (a dict) read with torch.load(weights_only=True). CheckpointError naming the file when it is
    missing, corrupt or truncated, not a dict, or holds anything but plain data (refused: nothing of it is run)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # refused content, corrupt zip, truncated file
        raise CheckpointError(_why_not_loaded(path, e, what)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a {what} of this project (expected a dict, got {type(ckpt).__name__})")
    return ckpt


def _plain(obj):
    """``obj`` with numpy arrays as tensors and numpy scalars as python numbers (containers rebuilt)."""
    import numpy as np
    import torch

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"a numpy array of dtype {obj.dtype}")
        return torch.from_numpy(obj.copy())  # TypeError for dtypes torch lacks (e.g. float128)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def convert_checkpoint(src, dst=None) -> dict:
    """Rewrite a checkpoint of an earlier version (numpy RNG states and arrays inside) into plain data.

    Safe for any file: it loads with weights_only=True plus an allowlist of exactly numpy's numeric arrays and
    scalars (no code the file names is run); anything else is refused with CheckpointError. RNG states become
    :func:`core.distributed.plain_rng_state`, other arrays tensors. ``dst`` defaults to ``src``, whose original is
    then kept as ``<src>.orig``. Returns {'src', 'dst', 'converted': bool (False: it was plain data already),
    'kept': path of the original or None}."""
    import torch

    from .distributed import plain_rng_state

    src = Path(src)
    dst = Path(dst) if dst is not None else src
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise CheckpointError(f"{src}: converting a checkpoint needs torch >= 2.6 (this is {torch.__version__})")
    try:
        ckpt = load_checkpoint(src)
        converted = False
    except CheckpointError:
        unsafe = _unsafe_globals(src)
        allowed = _numpy_data_globals()
        if not unsafe or not set(unsafe) <= set(allowed):
            raise  # missing, damaged, or content beyond numpy data: the message of load_checkpoint says which
        try:
            with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
                ckpt = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # e.g. an array of strings or objects: numpy data beyond numbers
            raise CheckpointError(f"{src}: cannot convert: it holds more than numeric numpy arrays ({_reason(e)})"
                                  ) from None
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"{src}: not a checkpoint of this project (expected a dict, got "
                                  f"{type(ckpt).__name__})")
        converted = True
    if isinstance(ckpt.get("rng"), dict):
        ckpt["rng"] = plain_rng_state(ckpt["rng"])
    if isinstance(ckpt.get("rng_ranks"), list):
        ckpt["rng_ranks"] = [plain_rng_state(st) for st in ckpt["rng_ranks"]]
    try:
        ckpt = _plain(ckpt)
    except TypeError as e:
        raise CheckpointError(f"{src}: cannot convert: it holds {e}, which has no plain form") from None
    kept = None
    if dst == src:
        if not converted:
            return {"src": str(src), "dst": str(dst), "converted": False, "kept": None}
        kept = src.with_name(src.name + ".orig")
        atomic_write_bytes(kept, src.read_bytes())
    atomic_torch_save(ckpt, dst)
    return {"src": str(src), "dst": str(dst), "converted": converted, "kept": str(kept) if kept else None}
