"""GCRA rate limiting (generic cell rate algorithm) with a memory and a Redis backend.

State per key is one number, the theoretical arrival time (TAT). A request at `now` is admitted
when `max(tat, now) + interval - now <= burst * interval`, and then TAT advances by `interval`
(= 1 / rate). From idle this admits `burst` requests at once, then one per `interval`.
Redis runs the same step in one Lua script on the server's clock (TIME), so replicas share one
exact limit without trusting their own clocks (proxy/quota/redis_limiter.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol


class QuotaStoreError(Exception):
    """The quota store failed or did not answer in time: the route's `quota.on_error` decides.
    Nothing else a limiter raises is one, so a bug is a 500, never quotas silently off."""




@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int  # requests that would be admitted right now after this one
    retry_after: float  # seconds until the next request fits (0 when some remain)
    reset: float  # seconds until the full burst is available again


def decide(allowed: bool, ahead: float, interval: float, burst: int) -> Decision:
    """Describe the state after one step; `ahead` = TAT - now in seconds."""
    room = burst * interval - ahead
    remaining = max(0, math.floor(room / interval + 1e-9))
    retry_after = 0.0 if remaining else max(0.0, interval - room)
    return Decision(allowed, remaining, retry_after, ahead)


class Limiter(Protocol):
    async def acquire(self, key: str, interval: float, burst: int) -> Decision:
        """Admit or refuse one request under `key`; raises QuotaStoreError on a store failure."""
        ...

    async def close(self) -> None: ...


class MemoryLimiter:
    """In-process GCRA; exact within one process. Keys whose TAT passed are dropped when the
    table grows past `max_keys` (a dropped key is indistinguishable from an idle one)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._tat: dict[str, float] = {}
        self._max_keys = max_keys

    async def acquire(self, key: str, interval: float, burst: int) -> Decision:
        now = time.monotonic()
        ahead = max(self._tat.get(key, now) - now, 0.0)  # TAT - now, relative to stay exact
        if ahead + interval > burst * interval * (1 + 1e-9):
            return decide(False, ahead, interval, burst)
        if key not in self._tat and len(self._tat) >= self._max_keys:
            self._sweep(now)
        self._tat[key] = now + ahead + interval
        return decide(True, ahead + interval, interval, burst)

    def _sweep(self, now: float) -> None:
        idle = [k for k, tat in self._tat.items() if tat <= now]
        for key in idle or list(self._tat)[: self._max_keys // 10 + 1]:
            del self._tat[key]

    async def close(self) -> None:
        self._tat.clear()
