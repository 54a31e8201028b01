"""Proxy events (start, drain, reload, dependency changes) as JSON lines on stdout.

A stand-in until the observability branch's event logger lands: same shape (`timestamp`,
`level`, `event`, then the event's fields), one `write` per line.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson


def emit(event: str, level: str = "info", **fields: Any) -> None:
    line = {"timestamp": iso_time(time.time()), "level": level, "event": event, **fields}
    sys.stdout.buffer.write(orjson.dumps(line, default=str) + b"\n")
    sys.stdout.buffer.flush()


def iso_time(epoch: float) -> str:
    """UTC ISO 8601 with milliseconds: 2026-01-17T03:36:48.250Z."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
    return f"{whole}.{int(epoch % 1 * 1000):03d}Z"
