"""Number formats for inference: 'auto' picks bfloat16 where the hardware multiplies it natively, float32 elsewhere.

bfloat16 matrix products are several times faster than float32 on CPUs with AMX (Intel Sapphire Rapids and later)
or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) and on CUDA GPUs; on other CPUs bfloat16 is emulated and
slower than float32, so 'auto' keeps float32 there (an AVX2-only AMD EPYC Zen 3, 2 cores: DeepMask inference 16x
and training steps 12-18x slower in bfloat16, README "Speed"); asking for bfloat16 there explicitly logs a warning.
"""
from __future__ import annotations

import functools
import logging

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)
TEST_CHOICES = (*CHOICES, "int8")  # detector.test_dtype: also the Fast R-CNN head's int8 products (detector.int8)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device) -> bool:
    """True on CUDA and on CPUs with native bfloat16 matrix units (AMX-BF16 or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_dtype(name: str, device, key: str, int8: bool = False) -> tuple[torch.dtype, str]:
    """(dtype, its name) for a config value of :data:`CHOICES` (with ``int8``: also 'int8', the Fast R-CNN head's
    int8 products on a CPU, detector.int8); ``key`` names the config key in errors."""
    choices = TEST_CHOICES if int8 else CHOICES
    if name not in choices:
        raise ConfigError(f"config key '{key}': expected one of {', '.join(choices)}, got {name!r}")
    if name == "int8":
        _check_int8(device, key)
        return torch.int8, name
    if name == "auto":
        name = "bfloat16" if native_bf16(device) else "float32"
    elif name == "bfloat16" and torch.device(device).type == "cpu" and not native_bf16(device):
        _warn_emulated(key)
    return DTYPES[name], name


@functools.cache
def _warn_emulated(key: str) -> None:
    log.warning("%s: bfloat16 on a CPU without AMX or AVX512-BF16 is emulated, many times slower than float32 "
                "(16x for DeepMask inference on an AVX2 AMD EPYC); 'auto' picks float32 here", key)


def _check_int8(device, key: str) -> None:
    """A one-line error naming the key where int8 cannot run: not a CPU (whether this PyTorch's oneDNN int8 product
    runs is probed where the layers are converted, detector.int8.Int8LinearReLU)."""
    if torch.device(device).type != "cpu":
        raise ConfigError(f"config key '{key}': int8 runs on a CPU only (device {device}); use auto or bfloat16")
