"""Pickles: unpickling runs code named by the file. They are read with a restricted unpickler that builds only numpy
arrays, numpy scalars, the builtin containers and detectron2's BoxMode (a local stand-in, no detectron2 needed);
anything else is refused with a message naming the object, unless ``trust_pickle`` (``--trust-pickle``) asks for
Python's full pickle (only for files you made yourself).
"""
from __future__ import annotations

import enum
import pickle
from pathlib import Path

import numpy as np

from core.errors import DataError


class BoxMode(enum.IntEnum):
    """Stand-in for detectron2.structures.BoxMode (same values), so its pickles load without detectron2."""

    XYXY_ABS = 0
    XYWH_ABS = 1
    XYXY_REL = 2
    XYWH_REL = 3
    XYWHA_ABS = 4


def _numpy_global(name):
    def get():
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                m = __import__(mod, fromlist=[name])
                return getattr(m, name)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"numpy has no {name}")  # pragma: no cover
    return get


_SAFE_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # bytes in protocol-2 pickles (latin1 text)
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("detectron2.structures.boxes", "BoxMode"): lambda: BoxMode,
    ("detectron2.structures", "BoxMode"): lambda: BoxMode,
}
for _mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
    for _name in ("_reconstruct", "scalar"):
        _SAFE_GLOBALS[(_mod, _name)] = _numpy_global(_name)
for _name in ("list", "dict", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "complex",
              "bytearray"):
    _SAFE_GLOBALS[("builtins", _name)] = (lambda n=_name: getattr(__import__("builtins"), n))
    _SAFE_GLOBALS[("__builtin__", _name)] = _SAFE_GLOBALS[("builtins", _name)]  # Python 2 pickles


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        get = _SAFE_GLOBALS.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return get()


def load_pickle(path, trust_pickle: bool = False):
    """A pickle's content; only numpy arrays / builtins / BoxMode unless trust_pickle (module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if trust_pickle:
                return pickle.load(f, encoding="latin1")
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise DataError(f"{path}: cannot unpickle ({e})") from None
        raise DataError(f"{path}: the pickle holds '{e}', which the safe loader does not build (it builds numpy "
                        "arrays and plain Python containers only); unpickling runs code from the file: pass "
                        "--trust-pickle to load it with Python's full pickle if you made this file yourself, or "
                        "convert it to .npz") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError, OSError) as e:
        raise DataError(f"{path}: cannot read the pickle ({type(e).__name__}: {e})") from None
