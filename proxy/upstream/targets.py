"""Runtime upstreams: one transport per target, smooth weighted round robin between the targets
that are healthy and whose circuit lets requests through, and per-target circuit breakers.

Read API for /health and /metrics: `Upstream.targets` (url, weight, healthy, breaker.state),
`Upstream.circuit_states()`, `Upstream.inflight`. Active health checks report with
`Upstream.set_target_healthy(index, healthy)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator

from yarl import URL

from proxy.config import Upstream as UpstreamConfig
from proxy.config.urls import redact_url
from proxy.http.headers import Headers
from proxy.http.problem import ProblemType
from proxy.observability.events import emit
from proxy.observability.instruments import TargetMetrics
from proxy.observability.metrics import Metrics, process_metrics
from proxy.upstream.breaker import CLOSED, CircuitBreaker
from proxy.upstream.h1 import H1Transport
from proxy.upstream.h1_state import Report, Violation
from proxy.upstream.transport import (
    Transport,
    UpstreamError,
    UpstreamNotSent,
    UpstreamResponse,
)


class CircuitOpen(UpstreamNotSent):
    """Every target's circuit is open: answered at once, nothing sent."""

    problem = ProblemType.CIRCUIT_OPEN


def target_label(url: str) -> str:
    """The `target` label of a target URL: host:port only, so no userinfo, path or query can
    reach a metric; targets come from the config, so the label set stays bounded."""
    parsed = URL(url)
    host = parsed.host or ""
    return f"[{host}]:{parsed.port}" if ":" in host else f"{host}:{parsed.port}"


class _Judged:
    """A response whose target's breaker hears the verdict when it is released, not when its
    head arrives: a body that breaks after a good head counts as a failure, and a half-open
    probe lasts until its body is through. The target's in-flight count ends there too."""

    __slots__ = ("_breaker", "_failed", "_generation", "_inflight", "_response",
                 "content_length", "headers", "reason", "status", "target")

    def __init__(
        self,
        response: UpstreamResponse,
        target: str,
        stats: TargetMetrics,
        breaker: CircuitBreaker | None,
        generation: int,
        failed: bool,
    ) -> None:
        self._response = response
        self.target = target
        self._inflight: TargetMetrics | None = stats
        self._breaker = breaker
        self._generation = generation
        self._failed: bool | None = failed
        self.status = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.content_length = response.content_length

    def chunks(self) -> AsyncIterator[bytes]:
        if self._breaker is None:  # no verdict to keep: the transport's own iterator
            return self._response.chunks()
        return self._judged_chunks()

    def whole_body(self) -> bytes | None:
        # A body that has all arrived cannot fail any more: no verdict to keep.
        return self._response.whole_body()

    async def _judged_chunks(self) -> AsyncIterator[bytes]:
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
        stats, self._inflight = self._inflight, None
        if stats is not None:
            stats.inflight.value -= 1
        breaker, self._breaker = self._breaker, None
        if breaker is not None:
            breaker.release(self._generation, self._failed)


def served_by(response: UpstreamResponse) -> str | None:
    """The target label of the target that sent `response` (from `Upstream.send`)."""
    return response.target if isinstance(response, _Judged) else None


class Target:
    __slots__ = ("breaker", "current", "healthy", "label", "stats", "transport", "url", "weight")

    def __init__(
        self, url: str, weight: int, config: UpstreamConfig, stats: TargetMetrics, report: Report
    ) -> None:
        self.url = url
        self.label = target_label(url)
        self.stats = stats
        self.weight = weight
        self.healthy = True
        self.current = 0  # smooth weighted round robin state
        self.transport: Transport = H1Transport(
            url,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            max_connections=config.max_connections,
            report=report,
        )
        breaker = config.circuit_breaker
        self.breaker = CircuitBreaker(breaker) if breaker is not None else None

    def available(self) -> bool:
        return self.weight > 0 and (self.breaker is None or self.breaker.allows())


class Upstream:
    """A named upstream: its targets, the choice between them and its in-flight count."""

    __slots__ = ("_failure_statuses", "config", "inflight", "name", "retrying", "targets")

    def __init__(self, name: str, config: UpstreamConfig, metrics: Metrics | None = None) -> None:
        self.name = name
        self.config = config
        weighted = (
            [(t.url, t.weight) for t in config.targets]
            if config.targets is not None
            else [(url, 1) for url in config.target_urls]
        )
        metrics = metrics or process_metrics()
        report = _reporter(name, metrics)
        self.targets = [
            Target(url, weight, config, metrics.target(name, target_label(url)), report)
            for url, weight in weighted
        ]
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
        generation = breaker.acquire() if breaker is not None else 0
        stats = chosen.stats
        stats.inflight.value += 1
        started = time.perf_counter()
        try:
            response = await chosen.transport.send(method, target, headers, body, deadline)
        except UpstreamError as exc:
            exc.target = chosen.label
            stats.inflight.value -= 1
            stats.failed(exc.sent, time.perf_counter() - started)
            if breaker is not None:
                breaker.release(generation, True)
            raise
        except BaseException:
            stats.inflight.value -= 1
            if breaker is not None:
                breaker.release(generation, None)  # cancelled: no verdict
            raise
        stats.answered(response.status, time.perf_counter() - started)
        failed = response.status in self._failure_statuses
        return _Judged(response, chosen.label, stats, breaker, generation, failed)

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

    def circuit_labels(self) -> list[tuple[str, str]]:
        """(target label, state) for idemproxy_circuit_state: never the URL (userinfo)."""
        return [(t.label, t.breaker.state if t.breaker else CLOSED) for t in self.targets]

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


def _reporter(upstream: str, metrics: Metrics) -> Report:
    """Count and log each discarded connection. The target URL is left out of the event: it
    may carry credentials, and the upstream name is enough to find the culprit."""
    counters = metrics.upstream_violations(upstream, Violation)

    def report(violation: Violation) -> None:
        counters[violation].value += 1
        emit("upstream_protocol_violation", "warning", upstream=upstream, reason=violation)

    return report
