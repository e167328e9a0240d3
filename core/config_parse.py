"""The generic half of the configuration: a mapping checked against dataclass annotations (with the full dotted key
in every error), `--set KEY=VALUE` parsing, and interval checks of a field's `range` metadata. core.config holds
the experiment's fields and uses these."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError

BIG = 1e30  # floats are at most 1e30 (SGD keeps them as float32); 'big' in a range


def type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`, converting where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_mapping(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-4 or 1e30, without a dot, as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_mapping(cls, data: dict, prefix: str = ""):
    types_of = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'" + suggest(k, names))
        kwargs[k] = _coerce(v, types_of[k], key)
    return cls(**kwargs)


def suggest(k, names) -> str:
    import difflib

    close = difflib.get_close_matches(str(k), sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def check_range(key: str, value, interval: str) -> None:
    lo_s, hi_s = (t.strip() for t in interval[1:-1].split(","))
    lo, hi = (BIG if t == "big" else float(t) for t in (lo_s, hi_s))
    items = value if isinstance(value, list) else [value]
    for i, v in enumerate(items):
        ok = (v > lo if interval[0] == "(" else v >= lo) and (v < hi if interval[-1] == ")" else v <= hi)
        if not ok:
            k = f"{key}[{i}]" if isinstance(value, list) else key
            shown = interval.replace("big", f"{BIG:g}")
            v = repr(v) if len(repr(v)) <= 24 else f"{float(v):.4g}"
            raise ConfigError(f"config key '{k}': {v} is out of range (expected a value in {shown})")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. detector.iters=1000")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set '{item}': malformed key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value
