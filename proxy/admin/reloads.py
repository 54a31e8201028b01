"""The reload history: the last reload attempts, shown by /health under config:reload."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.observability.events import iso_time

HISTORY = 10  # reload attempts kept for /health


@dataclass(frozen=True, slots=True)
class ReloadAttempt:
    time: float
    trigger: str
    result: Literal["success", "failure", "unchanged"]
    hash: str  # the config running after the attempt
    error: list[str] | None = None

    def render(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": iso_time(self.time),
            "trigger": self.trigger,
            "result": self.result,
            "hash": self.hash,
        }
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class ReloadLog:
    """The last reload attempts, for /health; `totals` feeds idemproxy_config_reloads_total."""

    started: float = field(default_factory=time.time)
    # A tuple replaced on every record, so another thread can iterate it safely.
    history: tuple[ReloadAttempt, ...] = ()
    totals: dict[str, int] = field(
        default_factory=lambda: {"success": 0, "failure": 0, "unchanged": 0}
    )

    def record(self, attempt: ReloadAttempt) -> None:
        self.history = (*self.history, attempt)[-HISTORY:]
        self.totals[attempt.result] += 1

    @property
    def last(self) -> ReloadAttempt | None:
        return self.history[-1] if self.history else None
