"""/metrics: names, types, label bounds and values after a known sequence of requests."""

from __future__ import annotations

import asyncio
import shutil
from asyncio.subprocess import PIPE, STDOUT

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse
from proxy.observability.instruments import BUCKETS
from proxy.observability.metrics import Metrics
from proxy.pipeline.runtime import Runtime
from tests.support.observed import observe
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

EXPECTED_TYPES = {
    "idemproxy_requests": "counter",
    "idemproxy_request_duration_seconds": "histogram",
    "idemproxy_upstream_duration_seconds": "histogram",
    "idemproxy_idempotency": "counter",
    "idemproxy_idempotency_decisions": "counter",
    "idemproxy_store_errors": "counter",
    "idemproxy_connections_rejected": "counter",
    "idemproxy_inflight_requests": "gauge",
    "idemproxy_config_reloads": "counter",
    "idemproxy_log_dropped": "counter",
    "idemproxy_upstream_up": "gauge",
    "idemproxy_circuit_state": "gauge",
    "idemproxy_proxy_responses": "counter",
    "idemproxy_upstream_requests": "counter",
    "idemproxy_upstream_request_duration_seconds": "histogram",
    "idemproxy_upstream_inflight_requests": "gauge",
    "idemproxy_build_info": "gauge",
    "idemproxy_spans_exported": "counter",
    "idemproxy_spans_dropped": "counter",
    "idemproxy_upstream_protocol_violations": "counter",
}


def _metrics_app(metrics: Metrics) -> web.Application:
    """The /metrics handler alone (the admin app also mounts it; a real process test scrapes
    the admin port)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    return app


def _config(upstream_url: str) -> dict[str, object]:
    return base_config(
        upstream_url,
        routes=[
            {
                "name": "payments",
                "match": {"path_prefix": "/pay", "methods": ["POST"]},
                "upstream": "app",
                "idempotency": {"enabled": True},
            },
            {"name": "orders", "match": {"path_prefix": "/orders"}, "upstream": "app"},
        ],
    )


async def test_scrape_after_a_known_sequence(aiohttp_client, upstream: RecordingUpstream) -> None:
    seen = await observe(aiohttp_client, _config(upstream.url))
    admin = await aiohttp_client(_metrics_app(seen.metrics))

    before = await admin.get("/metrics")
    assert before.status == 200
    assert before.headers["Content-Type"].startswith("text/plain")
    at_start = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(await before.text())
        for s in f.samples
    }
    # Known routes, upstreams and outcomes exist at 0 before any request.
    assert at_start[("idemproxy_requests_total", (("method", "POST"), ("route", "payments"), ("status_class", "5xx")))] == 0
    assert at_start[("idemproxy_requests_total", (("method", "GET"), ("route", "orders"), ("status_class", "2xx")))] == 0
    assert at_start[("idemproxy_idempotency_total", (("outcome", "replay"), ("route", "payments")))] == 0
    assert at_start[("idemproxy_upstream_duration_seconds_count", (("upstream", "app"),))] == 0
    assert at_start[("idemproxy_config_reloads_total", (("result", "failure"),))] == 0
    assert not any(labels and dict(labels).get("route") == "orders" and name.startswith("idemproxy_idempotency") for name, labels in at_start)

    for _ in range(3):
        assert (await seen.client.get("/orders/1")).status == 200
    assert (await seen.client.post("/pay")).status == 200
    for _ in range(2):  # executed once, replayed once
        assert (await seen.client.post("/pay", headers={"Idempotency-Key": "k"})).status == 200
    assert (await seen.client.get("/nowhere")).status == 404
    assert (await seen.client.request("PURGE", "/orders/pot")).status == 200
    await seen.lines.wait_for(8)
    seen.metrics.count_reload("failure")

    text = await (await admin.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    idemproxy = {name: f.type for name, f in families.items() if name.startswith("idemproxy_")}
    assert idemproxy == EXPECTED_TYPES
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }

    def requests(route: str, method: str, status_class: str) -> float:
        return values[("idemproxy_requests_total", (("method", method), ("route", route), ("status_class", status_class)))]

    assert requests("orders", "GET", "2xx") == 3
    assert requests("orders", "_OTHER", "2xx") == 1  # unknown methods never become label values
    assert requests("payments", "POST", "2xx") == 3
    # Executions and replays, countable apart (issue 13: a memory store restart shows as
    # executions without replays).
    assert values[("idemproxy_idempotency_total", (("outcome", "miss"), ("route", "payments")))] == 1
    assert values[("idemproxy_idempotency_total", (("outcome", "replay"), ("route", "payments")))] == 1
    assert values[("idemproxy_idempotency_decisions_total", (("decision", "complete"), ("route", "payments")))] == 1
    assert values[("idemproxy_idempotency_decisions_total", (("decision", "indeterminate"), ("route", "payments")))] == 0
    assert requests("", "GET", "4xx") == 1  # no route: the empty route label
    assert values[("idemproxy_request_duration_seconds_count", (("route", "orders"),))] == 4
    assert values[("idemproxy_upstream_duration_seconds_count", (("upstream", "app"),))] == 6
    assert values[("idemproxy_inflight_requests", (("upstream", ""),))] == 0
    assert values[("idemproxy_config_reloads_total", (("result", "failure"),))] == 1
    assert values[("idemproxy_log_dropped_total", ())] == 0
    buckets = [
        float(dict(labels)["le"]) for name, labels in values
        if name == "idemproxy_request_duration_seconds_bucket" and dict(labels)["route"] == "orders"
    ]
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    assert not any("/" in value for _, labels in values for _, value in labels)  # no paths

    if shutil.which("promtool"):
        check = await asyncio.create_subprocess_exec(
            "promtool", "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
        )
        output, _ = await asyncio.wait_for(check.communicate(text.encode()), 30)
        assert check.returncode == 0, output


def test_methods_stay_bounded() -> None:
    metrics = Metrics()
    route = metrics.route("r")
    for i in range(200):
        route.request(f"X{i}", 200, 0.001)
    samples = [
        s for f in metrics.registry.collect() if f.name == "idemproxy_requests" for s in f.samples
        if s.name.endswith("_total")
    ]
    assert [(s.labels["method"], s.value) for s in samples] == [("_OTHER", 200)]


def test_unknown_idempotency_outcomes_are_ignored() -> None:
    metrics = Metrics()
    metrics.route("r").idempotency("surprise")
    metrics.route("r").idempotency("miss")
    outcomes = {
        s.labels["outcome"]: s.value for f in metrics.registry.collect()
        if f.name == "idemproxy_idempotency" for s in f.samples if s.name.endswith("_total")
    }
    assert outcomes == {"miss": 1}


def test_log_drops_are_read_from_the_sink_at_scrape_time() -> None:
    dropped = [0]
    metrics = Metrics(lambda: dropped[0])
    dropped[0] = 7
    [family] = [f for f in metrics.registry.collect() if f.name == "idemproxy_log_dropped"]
    assert family.samples[0].value == 7


@pytest.mark.parametrize("accept", ["application/openmetrics-text; version=1.0.0", ""])
async def test_exposition_formats(aiohttp_client, accept: str) -> None:
    admin = await aiohttp_client(_metrics_app(Metrics()))
    response = await admin.get("/metrics", headers={"Accept": accept} if accept else {})
    body = await response.text()
    assert "# TYPE idemproxy_requests counter" in body or "# TYPE idemproxy_requests_total counter" in body
    assert response.headers["Content-Type"].startswith(
        "application/openmetrics-text" if accept else "text/plain"
    )


async def test_series_survive_a_reload_and_new_routes_start_at_zero(upstream: RecordingUpstream) -> None:
    metrics = Metrics()
    old = Runtime(parse(base_config(upstream.url), env={}), metrics=metrics)
    metrics.route("default").request("GET", 200, 0.01)
    config = base_config(upstream.url)
    config["routes"].insert(0, {"name": "fresh", "match": {"path_prefix": "/new"}, "upstream": "app"})
    new = Runtime(parse(config, env={}), metrics=metrics)
    await old.close()
    await new.close()
    assert metrics.requests[("default", "GET", "2xx")].value == 1
    assert metrics.requests[("fresh", "POST", "5xx")].value == 0


async def test_upstream_health_and_circuit_gauges_read_the_live_views(aiohttp_client) -> None:
    metrics = Metrics()
    metrics.upstream_up = lambda: {"app": True, "legacy": False}
    metrics.circuit_states = lambda: [("app", "http://a:1", 0.0), ("app", "http://b:2", 1.0)]
    admin = await aiohttp_client(_metrics_app(metrics))
    text = await (await admin.get("/metrics")).text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("idemproxy_upstream_up", (("upstream", "app"),))] == 1.0
    assert samples[("idemproxy_upstream_up", (("upstream", "legacy"),))] == 0.0
    assert samples[("idemproxy_circuit_state", (("target", "http://b:2"), ("upstream", "app")))] == 1.0
    assert samples[("idemproxy_circuit_state", (("target", "http://a:1"), ("upstream", "app")))] == 0.0
