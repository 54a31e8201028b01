"""Circuit breaker for one upstream target: closed -> open -> half_open -> closed.

Pure state machine; the clock is injected so tests can drive it. Every admitted request gets
the current generation from `acquire()` and reports its outcome with `release()`; outcomes of
requests admitted under an earlier state are ignored, so a slow failure from before a recovery
cannot reopen the circuit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from proxy.config import CircuitBreaker as BreakerConfig

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
# Gauge values for idemproxy_circuit_state.
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
_BUCKETS = 10


class CircuitBreaker:
    __slots__ = (
        "_buckets",
        "_clock",
        "_config",
        "_consecutive",
        "_probes",
        "_successes",
        "generation",
        "opened_at",
        "state",
    )

    def __init__(
        self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self.state = CLOSED
        self.generation = 0
        self.opened_at = 0.0
        self._consecutive = 0
        # [bucket start, requests, failures] covering the last `window` seconds.
        self._buckets: deque[list[float]] = deque()
        self._probes = 0
        self._successes = 0

    def allows(self) -> bool:
        """Whether a request may go to this target now (moves open -> half_open on time)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self._clock() - self.opened_at < self._config.open_for:
                return False
            self._enter(HALF_OPEN)
        return self._probes < self._config.half_open_requests

    def acquire(self) -> int:
        """Admit one request (call after `allows()`); returns the generation for `release`."""
        if self.state == HALF_OPEN:
            self._probes += 1
        return self.generation

    def release(self, generation: int, failed: bool | None) -> None:
        """Report an outcome; `failed=None` means abandoned (cancelled) without a verdict."""
        if generation != self.generation:
            return
        if self.state == HALF_OPEN:
            self._probes -= 1
            if failed:
                self._open()
            elif failed is not None:
                self._successes += 1
                if self._successes >= self._config.half_open_requests:
                    self._enter(CLOSED)
        elif self.state == CLOSED and failed is not None:
            self._record(failed)

    def retry_after(self) -> float:
        """Seconds until the circuit lets a probe through (0 when it does now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self._config.open_for - self._clock())

    def _record(self, failed: bool) -> None:
        config = self._config
        self._consecutive = self._consecutive + 1 if failed else 0
        if config.consecutive_failures is not None and (
            self._consecutive >= config.consecutive_failures
        ):
            self._open()
            return
        if config.failure_ratio is None:
            return
        now = self._clock()
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - config.window:
            buckets.popleft()
        if not buckets or buckets[-1][0] <= now - config.window / _BUCKETS:
            buckets.append([now, 0, 0])
        buckets[-1][1] += 1
        buckets[-1][2] += failed
        requests = sum(b[1] for b in buckets)
        failures = sum(b[2] for b in buckets)
        if requests >= config.min_requests and failures >= config.failure_ratio * requests:
            self._open()

    def _open(self) -> None:
        self._enter(OPEN)
        self.opened_at = self._clock()

    def _enter(self, state: str) -> None:
        self.state = state
        self.generation += 1
        self._consecutive = 0
        self._buckets.clear()
        self._probes = 0
        self._successes = 0
