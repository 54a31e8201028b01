"""One Prometheus registry (not the library's global one) and the proxy's instruments.

The request path only bumps plain numbers held in per-route objects (an attribute add and a
bisect, no lock, no `.labels()`; proxy/observability/instruments.py); the registry turns them
into metric families when scraped, in a worker thread. Labels come only from bounded sets:
route and upstream names from the config, a fixed method set (others count as `_OTHER`),
status classes, idempotency outcomes, reload results. A config's series exist (at 0) from the
moment it is compiled.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy import __version__
from proxy.config import Config
from proxy.observability import logsink
from proxy.observability.instruments import Cell, Histogram, RouteMetrics, TargetMetrics

# Series created up front for routes that accept any method.
COMMON_METHODS = ("GET", "POST")
RELOAD_RESULTS = ("success", "failure", "unchanged")
NO_ROUTE = ""
"""`route` label of requests that matched no route (404, rejections before routing)."""


class Metrics:
    """The instruments of one process (they survive config reloads) and their registry."""

    def __init__(self, dropped: Callable[[], int] = lambda: 0) -> None:
        self.requests: dict[tuple[str, str, str], Cell] = {}
        self.request_duration: dict[str, Histogram] = {}
        self.upstream_duration: dict[str, Histogram] = {}
        self.idempotency: dict[tuple[str, str], Cell] = {}
        self.proxy_responses: dict[tuple[str, str], Cell] = {}
        self.target_requests: dict[tuple[str, str, str], Cell] = {}
        self.target_duration: dict[tuple[str, str], Histogram] = {}
        self.target_inflight: dict[tuple[str, str], Cell] = {}
        self.protocol_violations: dict[tuple[str, str], Cell] = {}
        self.decisions: dict[tuple[str, str], Cell] = {}
        self.store_errors = Cell()
        self.inflight = Cell()
        self.connections_rejected = Cell()
        # Span export (proxy/observability/spans.py): sent, dropped on a full queue, lost in
        # an export that failed.
        self.spans_exported = Cell()
        self.spans_dropped = Cell()
        self.spans_failed = Cell()
        self.config_reloads = {result: Cell() for result in RELOAD_RESULTS}
        self._dropped = dropped
        # Live views the server plugs in: upstream name -> health, and
        # (upstream, target url, 0 closed | 1 open | 2 half-open) per circuit.
        self.upstream_up: Callable[[], dict[str, bool]] = dict
        self.circuit_states: Callable[[], list[tuple[str, str, float]]] = list
        # The memory store's budget (None on Redis): bytes used, limit, claims refused for
        # lack of bytes, responses not kept for replay.
        self.store_memory: StoreMemory | None = None
        # upstream name -> requests in progress (admitted by its admission stage).
        self.upstream_inflight: Callable[[], dict[str, int]] = dict
        self.routes: dict[str, RouteMetrics] = {}
        self.unrouted = RouteMetrics(self, NO_ROUTE, (), idempotent=False)
        self.registry = CollectorRegistry()
        self.registry.register(self)
        # process_* (memory, CPU, fds, start time) and python_info, read at scrape time.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def compile(self, config: Config) -> None:
        """Create the series of the config's routes and upstreams (kept across reloads)."""
        for route in config.routes:
            if route.name not in self.routes:
                self.routes[route.name] = RouteMetrics(
                    self,
                    route.name,
                    route.match.methods or COMMON_METHODS,
                    route.idempotency.enabled,
                )
        for name in config.upstreams:
            self.upstream(name)

    def route(self, name: str | None) -> RouteMetrics:
        if name is None:
            return self.unrouted
        metrics = self.routes.get(name)
        if metrics is None:
            metrics = self.routes[name] = RouteMetrics(self, name, (), idempotent=False)
        return metrics

    def upstream(self, name: str) -> Histogram:
        histogram = self.upstream_duration.get(name)
        if histogram is None:
            histogram = self.upstream_duration[name] = Histogram()
        return histogram

    def target(self, upstream: str, target: str) -> TargetMetrics:
        return TargetMetrics(self, upstream, target)
    def upstream_violations(self, upstream: str, reasons: Iterable[str]) -> dict[str, Cell]:
        """The upstream's protocol violation counters by reason, created at 0."""
        return {
            reason: self.protocol_violations.setdefault((upstream, reason), Cell())
            for reason in reasons
        }

    def count_reload(self, result: str) -> None:
        """Hook for the reloader: one call per attempt (`success`, `failure`, `unchanged`)."""
        cell = self.config_reloads.get(result)
        if cell is not None:
            cell.value += 1

    def _inflight(self) -> GaugeMetricFamily:
        """Per upstream; `upstream=""` holds requests not (yet) admitted to one, so the sum is
        every request in progress."""
        family = GaugeMetricFamily(
            "idemproxy_inflight_requests", "Requests in progress, by upstream.", labels=["upstream"]
        )
        admitted = 0
        for name, count in list(self.upstream_inflight().items()):
            family.add_metric([name], count)
            admitted += count
        family.add_metric([NO_ROUTE], max(0, self.inflight.value - admitted))
        return family

    def collect(self) -> Iterator[Metric]:
        """The registry's view; runs in a worker thread, so dicts are copied before iterating."""
        yield _counters(
            "idemproxy_requests",
            "Requests answered, by route, method and status class.",
            ["route", "method", "status_class"],
            list(self.requests.items()),
        )
        yield _counters(
            "idemproxy_proxy_responses",
            "Answers the proxy made itself instead of relaying the upstream's, by route and reason"
            " (a subset of idemproxy_requests_total).",
            ["route", "reason"],
            list(self.proxy_responses.items()),
        )
        yield _histograms(
            "idemproxy_request_duration_seconds",
            "Time from the request head to the response handed back, by route.",
            "route",
            self.request_duration,
        )
        yield _histograms(
            "idemproxy_upstream_duration_seconds",
            "Time until the upstream's response head, by upstream.",
            "upstream",
            self.upstream_duration,
        )
        yield _counters(
            "idemproxy_upstream_requests",
            "Attempts sent to each upstream target, by answer status class or failure.",
            ["upstream", "target", "outcome"],
            list(self.target_requests.items()),
        )
        yield _histograms(
            "idemproxy_upstream_request_duration_seconds",
            "Time from sending an attempt to its response head (or failure), by target.",
            ["upstream", "target"],
            self.target_duration,
        )
        yield _counters(
            "idemproxy_idempotency",
            "Idempotency decisions, by route and outcome.",
            ["route", "outcome"],
            list(self.idempotency.items()),
        )
        yield _counters(
            "idemproxy_upstream_protocol_violations",
            "Upstream connections discarded for bytes outside a response's framing, by reason.",
            ["upstream", "reason"],
            list(self.protocol_violations.items()),
        )
        yield _counters(
            "idemproxy_idempotency_decisions",
            "How claimed requests ended, by route: complete (executed, answer stored for "
            "replay), release (not sent or a try-again answer), indeterminate (may have run).",
            ["route", "decision"],
            list(self.decisions.items()),
        )
        yield CounterMetricFamily(
            "idemproxy_store_errors",
            "Requests that met a store failure.",
            value=self.store_errors.value,
        )
        yield CounterMetricFamily(
            "idemproxy_connections_rejected",
            "Client connections answered 503 and closed because limits.max_connections were open.",
            value=self.connections_rejected.value,
        )
        yield self._inflight()
        targets = GaugeMetricFamily(
            "idemproxy_upstream_inflight_requests",
            "Attempts waiting for or streaming an answer from each upstream target.",
            labels=["upstream", "target"],
        )
        for (upstream, target), cell in list(self.target_inflight.items()):
            targets.add_metric([upstream, target], cell.value)
        yield targets
        build = GaugeMetricFamily(
            "idemproxy_build_info",
            "Always 1; the labels say which idemproxy and Python run.",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        up = GaugeMetricFamily(
            "idemproxy_upstream_up",
            "1 while the upstream's active health check passes, by upstream.",
            labels=["upstream"],
        )
        for name, healthy in list(self.upstream_up().items()):
            up.add_metric([name], 1.0 if healthy else 0.0)
        yield up
        circuits = GaugeMetricFamily(
            "idemproxy_circuit_state",
            "Circuit breaker state per target: 0 closed, 1 open, 2 half-open.",
            labels=["upstream", "target"],
        )
        for upstream, target, state in self.circuit_states():
            circuits.add_metric([upstream, target], state)
        yield circuits
        if self.store_memory is not None:
            yield from _store_memory(self.store_memory)
        yield CounterMetricFamily(
            "idemproxy_spans_exported",
            "Spans the OTLP collector accepted.",
            value=self.spans_exported.value,
        )
        yield _counters(
            "idemproxy_spans_dropped",
            "Spans lost: queue_full (the export queue was full), export_failed (the collector"
            " refused them or could not be reached).",
            ["reason"],
            [(("queue_full",), self.spans_dropped), (("export_failed",), self.spans_failed)],
        )
        yield _counters(
            "idemproxy_config_reloads",
            "Config reload attempts, by result.",
            ["result"],
            [((result,), cell) for result, cell in self.config_reloads.items()],
        )
        yield CounterMetricFamily(
            "idemproxy_log_dropped",
            "Log lines dropped because the log output could not keep up.",
            value=self._dropped(),
        )

    async def handle(self, request: web.BaseRequest) -> web.Response:
        """GET /metrics: rendered in a worker thread so /live and the data plane stay prompt."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.to_thread(encoder, self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})


def _counters(
    name: str, documentation: str, labels: list[str], cells: Iterable[tuple[Sequence[str], Cell]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, cell in cells:
        family.add_metric(values, cell.value)
    return family


def _histograms(
    name: str,
    documentation: str,
    labels: str | list[str],
    series: dict[str, Histogram] | dict[tuple[str, str], Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        name, documentation, labels=[labels] if isinstance(labels, str) else labels
    )
    for value, histogram in list(series.items()):
        values = [value] if isinstance(value, str) else list(value)
        family.add_metric(values, histogram.cumulative(), histogram.sum)
    return family


class StoreMemory(Protocol):
    used: int
    limit: int
    refused_claims: int
    unkept_responses: int


def _store_memory(levels: StoreMemory) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "idemproxy_store_memory_bytes",
        "Bytes held by the memory store's records and stored responses (estimated).",
        value=levels.used,
    )
    yield GaugeMetricFamily(
        "idemproxy_store_memory_limit_bytes", "store.max_bytes.", value=levels.limit
    )
    refusals = CounterMetricFamily(
        "idemproxy_store_memory_refusals",
        "Memory store at its byte limit: new keys refused (claim), responses recorded as not "
        "replayable (response).",
        labels=["kind"],
    )
    refusals.add_metric(["claim"], levels.refused_claims)
    refusals.add_metric(["response"], levels.unkept_responses)
    yield refusals


_process: Metrics | None = None


def process_metrics() -> Metrics:
    """The process's metrics, shared by every Runtime a reload builds (counters never reset)."""
    global _process
    if _process is None:
        _process = Metrics(lambda: logsink.STDOUT.dropped)
    return _process
