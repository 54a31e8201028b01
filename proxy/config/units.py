"""Units in the config: durations (`250ms`, `24h`), sizes (`16KiB`), rates (`100/s`), ratios
(`20%`), each parsed at load and written back the same way by `idemproxy check`."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field, PlainSerializer

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


def parse_duration(value: object) -> object:
    """`250ms`, `30s`, `5m`, `24h`, `7d` -> seconds; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 30s or 24h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match[1]) * _DURATION_UNITS[match[2]]
    raise ValueError(f"expected a duration like 250ms, 30s or 24h, got {value!r}")


def format_duration(seconds: float) -> str:
    for unit, factor in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds / factor)}{unit}"
    return f"{round(seconds * 1000, 3):g}ms"


def parse_size(value: object) -> object:
    """`1MiB`, `16KiB`, `10MB`, `512` (bytes) -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 16KiB or 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()])
    raise ValueError(f"expected a size like 16KiB or 10MiB, got {value!r}")


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_rate(value: object) -> object:
    """`100/s`, `600/m`, `1000/h` -> requests per second."""
    if isinstance(value, str):
        match = _RATE_RE.match(value)
        if match and float(match[1]) > 0:
            return float(match[1]) / _RATE_UNITS[match[2]]
    raise ValueError(f"expected a rate like 100/s, 600/m or 1000/h, got {value!r}")


def format_rate(per_second: float) -> str:
    return f"{per_second:g}/s"


def parse_ratio(value: object) -> object:
    """`20%` or `0.2` -> 0.2."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            pass
        raise ValueError(f"expected a ratio like 20% or 0.2, got {value!r}")
    return value


Ratio = Annotated[float, BeforeValidator(parse_ratio), Field(gt=0, le=1)]
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
# For intervals and probe timeouts, where zero would mean a busy loop or a check that cannot pass.
PositiveDuration = Annotated[Duration, Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
Deadline = Annotated[Duration, Field(gt=0)]
Rate = Annotated[float, BeforeValidator(parse_rate), PlainSerializer(format_rate)]
