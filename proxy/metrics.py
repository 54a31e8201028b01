"""One Prometheus registry (not the library's global one) and the proxy's instruments.

Labels come only from bounded sets: route names and upstream names from the config, a fixed
method set (others count as `_OTHER`), status classes, idempotency outcomes, reload results.
Children are created when a config is compiled, so known series read 0 from startup and the
request path never calls `.labels()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics as _disable_created
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from proxy import logsink
from proxy.config import Config

# OpenTelemetry's advisory buckets for http.server.request.duration, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
OTHER_METHOD = "_OTHER"
# Series created up front for routes that accept any method.
COMMON_METHODS = ("GET", "POST")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
OUTCOMES = ("miss", "replay", "conflict", "mismatch", "bypass", "indeterminate", "store_error")
RELOAD_RESULTS = ("success", "failure", "unchanged")
NO_ROUTE = ""
"""`route` label of requests that matched no route (404, rejections before routing)."""

# `_created` gauges double the series count and Prometheus' text parser ignores them.
_disable_created()  # type: ignore[no-untyped-call]


class RouteMetrics:
    """The children for one route, so a request costs dict lookups and `inc`/`observe` only."""

    __slots__ = ("_idempotency", "_metrics", "_requests", "duration", "name")

    def __init__(self, metrics: Metrics, name: str, methods: Iterable[str], idempotent: bool):
        self.name = name
        self._metrics = metrics
        self._requests: dict[tuple[str, int], Counter] = {}
        self._idempotency: dict[str, Counter] = {}
        self.duration = metrics.request_duration.labels(name)
        for method in methods:
            for status_class in range(2, 6):
                self._request_child(method, status_class)
        if idempotent:
            for outcome in OUTCOMES:
                self._idempotency_child(outcome)

    def request(self, method: str, status: int, seconds: float) -> None:
        key = (method, status // 100)
        child = self._requests.get(key)
        if child is None:
            child = self._request_child(method, key[1])
        child.inc()
        self.duration.observe(seconds)

    def idempotency(self, outcome: str) -> None:
        child = self._idempotency.get(outcome)
        if child is None:
            if outcome not in OUTCOMES:
                return
            child = self._idempotency_child(outcome)
        child.inc()

    def _request_child(self, method: str, status_class: int) -> Counter:
        label = method if method in METHODS else OTHER_METHOD
        child = self._metrics.requests.labels(self.name, label, f"{status_class}xx")
        self._requests[(method, status_class)] = child
        return child

    def _idempotency_child(self, outcome: str) -> Counter:
        child = self._metrics.idempotency.labels(self.name, outcome)
        self._idempotency[outcome] = child
        return child


class _DroppedLines:
    """idemproxy_log_dropped_total, read from the log sink at scrape time."""

    def __init__(self, dropped: Callable[[], int]) -> None:
        self._dropped = dropped

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "idemproxy_log_dropped",
            "Log lines dropped because the log output could not keep up.",
            value=self._dropped(),
        )


class Metrics:
    """The registry and instruments of one process; survives config reloads."""

    def __init__(self, dropped: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "idemproxy_requests",
            "Requests answered, by route, method and status class.",
            ["route", "method", "status_class"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "idemproxy_request_duration_seconds",
            "Time from request head to the end of the response, by route.",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "idemproxy_upstream_duration_seconds",
            "Time the upstream took to answer (response head), by upstream.",
            ["upstream"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.idempotency = Counter(
            "idemproxy_idempotency",
            "Idempotency decisions, by route and outcome.",
            ["route", "outcome"],
            registry=registry,
        )
        self.store_errors = Counter(
            "idemproxy_store_errors", "Requests that met a store failure.", registry=registry
        )
        self.inflight = Gauge(
            "idemproxy_inflight_requests", "Requests in progress.", registry=registry
        )
        self.config_reloads = Counter(
            "idemproxy_config_reloads",
            "Config reload attempts, by result.",
            ["result"],
            registry=registry,
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        registry.register(_DroppedLines(dropped))
        self.routes: dict[str, RouteMetrics] = {}
        self.upstreams: dict[str, Histogram] = {}
        self.unrouted = RouteMetrics(self, NO_ROUTE, (), idempotent=False)

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
        child = self.upstreams.get(name)
        if child is None:
            child = self.upstreams[name] = self.upstream_duration.labels(name)
        return child

    def count_reload(self, result: str) -> None:
        """Hook for the reloader: one call per attempt (`success`, `failure`, `unchanged`)."""
        self.config_reloads.labels(result).inc()

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics: the exposition is rendered off the event loop so /live stays prompt."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.to_thread(encoder, self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})


_process: Metrics | None = None


def process_metrics() -> Metrics:
    """The process's metrics, shared by every Runtime a reload builds (counters never reset)."""
    global _process
    if _process is None:
        _process = Metrics(lambda: logsink.STDOUT.dropped)
    return _process
