"""Number formats for inference: 'auto' picks bfloat16 where the hardware multiplies it natively, float32 elsewhere.

bfloat16 matrix products are several times faster than float32 on CPUs with AMX (Intel Sapphire Rapids and later)
or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) and on CUDA GPUs; on other CPUs bfloat16 is emulated and
slower than float32, so 'auto' keeps float32 there.
"""
from __future__ import annotations

import functools

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)


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


def resolve_dtype(name: str, device, key: str) -> tuple[torch.dtype, str]:
    """(dtype, its name) for a config value of :data:`CHOICES`; ``key`` names the config key in errors."""
    if name not in CHOICES:
        raise ConfigError(f"config key '{key}': expected one of {', '.join(CHOICES)}, got {name!r}")
    if name == "auto":
        name = "bfloat16" if native_bf16(device) else "float32"
    return DTYPES[name], name
