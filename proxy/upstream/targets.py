"""Runtime upstreams: one transport per target, smooth weighted round robin between the targets
that are healthy and whose circuit lets requests through, and per-target circuit breakers.

Read API for /health and /metrics: `Upstream.targets` (url, weight, healthy, breaker.state),
`Upstream.circuit_states()`, `Upstream.inflight`. Active health checks report with
`Upstream.set_target_healthy(index, healthy)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

from proxy.config import Upstream as UpstreamConfig
from proxy.config.urls import redact_url
from proxy.http.headers import Headers
from proxy.upstream.breaker import CLOSED, CircuitBreaker
from proxy.upstream.h1 import H1Transport
from proxy.upstream.transport import (
    AiohttpTransport,
    Transport,
    UpstreamError,
    UpstreamNotSent,
    UpstreamResponse,
)

TRANSPORTS: dict[str, type[AiohttpTransport] | type[H1Transport]] = {
    "h1": H1Transport,
    "aiohttp": AiohttpTransport,
}


class CircuitOpen(UpstreamNotSent):
    """Every target's circuit is open: answered at once, nothing sent."""

    status = 503
    slug = "circuit-open"
    title = "Circuit open"


class _Judged:
    """A response whose target's breaker hears the verdict when it is released, not when its
    head arrives: a body that breaks after a good head counts as a failure, and a half-open
    probe lasts until its body is through."""

    __slots__ = ("_breaker", "_failed", "_generation", "_response", "content_length", "headers",
                 "reason", "status")

    def __init__(
        self, response: UpstreamResponse, breaker: CircuitBreaker, generation: int, failed: bool
    ) -> None:
        self._response = response
        self._breaker: CircuitBreaker | None = breaker
        self._generation = generation
        self._failed: bool | None = failed
        self.status = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.content_length = response.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.chunks():
                yield chunk
        except UpstreamError:
            self._failed = True
            raise
        except asyncio.CancelledError:
            self._failed = None  # abandoned: no verdict
            raise

    def release(self) -> None:
        self._response.release()
        breaker, self._breaker = self._breaker, None
        if breaker is not None:
            breaker.release(self._generation, self._failed)


class Target:
    __slots__ = ("breaker", "current", "healthy", "transport", "url", "weight")

    def __init__(self, url: str, weight: int, config: UpstreamConfig) -> None:
        self.url = url
        self.weight = weight
        self.healthy = True
        self.current = 0  # smooth weighted round robin state
        self.transport: Transport = TRANSPORTS[config.transport](
            url,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            max_connections=config.max_connections,
        )
        breaker = config.circuit_breaker
        self.breaker = CircuitBreaker(breaker) if breaker is not None else None

    def available(self) -> bool:
        return self.weight > 0 and (self.breaker is None or self.breaker.allows())


class Upstream:
    """A named upstream: its targets, the choice between them and its in-flight count."""

    __slots__ = ("_failure_statuses", "config", "inflight", "name", "retrying", "targets")

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        weighted = (
            [(t.url, t.weight) for t in config.targets]
            if config.targets is not None
            else [(url, 1) for url in config.target_urls]
        )
        self.targets = [Target(url, weight, config) for url, weight in weighted]
        breaker = config.circuit_breaker
        self._failure_statuses = frozenset(breaker.failure_statuses if breaker else ())
        # Requests in progress (admission stage) and those of them retrying (retry policy).
        self.inflight = 0
        self.retrying = 0

    def pick(self) -> Target | None:
        """Smooth weighted round robin (nginx) over available targets; unhealthy targets are
        skipped unless none is healthy (then health is ignored rather than failing all)."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0] if targets[0].available() else None
        candidates = [t for t in targets if t.healthy and t.available()]
        if not candidates:
            candidates = [t for t in targets if not t.healthy and t.available()]
        if not candidates:
            return None
        total = 0
        best = candidates[0]
        for target in candidates:
            target.current += target.weight
            total += target.weight
            if target.current > best.current:
                best = target
        best.current -= total
        return best

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """One attempt on one picked target; the target's breaker learns the outcome."""
        chosen = self.pick()
        if chosen is None:
            raise self._circuit_open()
        breaker = chosen.breaker
        if breaker is None:
            return await chosen.transport.send(method, target, headers, body, deadline)
        generation = breaker.acquire()
        try:
            response = await chosen.transport.send(method, target, headers, body, deadline)
        except UpstreamError:
            breaker.release(generation, True)
            raise
        except BaseException:
            breaker.release(generation, None)  # cancelled: no verdict
            raise
        return _Judged(response, breaker, generation, response.status in self._failure_statuses)

    def _circuit_open(self) -> CircuitOpen:
        waits = [t.breaker.retry_after() for t in self.targets if t.weight and t.breaker]
        error = CircuitOpen(f"every target of upstream {self.name!r} has an open circuit")
        error.retry_after = min(waits, default=1.0)
        return error

    def set_target_healthy(self, index: int, healthy: bool) -> None:
        """Active health checks eject (False) or restore (True) `targets[index]`."""
        self.targets[index].healthy = healthy

    def circuit_states(self) -> list[tuple[str, str]]:
        """(target url, closed|open|half_open) for every target (idemproxy_circuit_state)."""
        return [(redact_url(t.url), t.breaker.state if t.breaker else CLOSED) for t in self.targets]

    def snapshot(self) -> list[dict[str, object]]:
        """Per target, for /health: url, weight, healthy, circuit (None without a breaker),
        seconds until a probe."""
        return [
            {
                "url": redact_url(t.url),
                "weight": t.weight,
                "healthy": t.healthy,
                "circuit": t.breaker.state if t.breaker else None,
                "retry_after": t.breaker.retry_after() if t.breaker else 0.0,
            }
            for t in self.targets
        ]

    def inherit(self, previous: Upstream) -> None:
        """After a reload: keep health and circuit state of targets whose URL is unchanged."""
        before = {t.url: t for t in previous.targets}
        for target in self.targets:
            old = before.get(target.url)
            if old is not None:
                target.healthy = old.healthy
                if previous.config.circuit_breaker == self.config.circuit_breaker:
                    target.breaker = old.breaker

    async def close(self) -> None:
        for target in self.targets:
            await target.transport.close()
