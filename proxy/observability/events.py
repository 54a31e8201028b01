"""Proxy events (start, drain, reload, store errors, ...) as JSON lines on the log sink.

Same shape as the access log: `timestamp`, `level`, `event`, then the event's fields. Lines below
the configured `logging.level` are skipped.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.observability import logsink

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_threshold = LEVELS["info"]
_sink: logsink.LineWriter = logsink.STDOUT


def configure(level: str, sink: logsink.LineWriter | None = None) -> None:
    """Set the minimum level (`logging.level`) and, in tests, where lines go."""
    global _threshold, _sink
    _threshold = LEVELS[level]
    if sink is not None:
        _sink = sink


def emit(event: str, level: str = "info", **fields: Any) -> None:
    """Write one event line, e.g. `emit("config_reload", result="failure", error=[...])`."""
    if LEVELS.get(level, 40) < _threshold:
        return
    line = {"timestamp": iso_time(time.time()), "level": level, "event": event, **fields}
    _sink.write(orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE), urgent=True)


_second = -1
_second_text = ""


def iso_time(epoch: float) -> str:
    """UTC ISO 8601 with milliseconds: 2026-01-17T03:36:48.250Z (the second part is cached)."""
    global _second, _second_text
    whole = int(epoch)
    if whole != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = whole
    return f"{_second_text}.{int((epoch - whole) * 1000):03d}Z"
