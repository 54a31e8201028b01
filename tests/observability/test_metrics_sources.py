"""Who answered: proxy-made answers by reason apart from upstream answers, per-target series,
in-flight by upstream, build info and process metrics (in every worker and summed by the
supervisor)."""

from __future__ import annotations

import asyncio
import platform
import socket
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.observability.answers import ProxyReason, proxy_reason
from proxy.upstream.targets import target_label
from tests.support.observed import observe
from tests.support.ports import free_port, wait_until
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def proxy_made(samples: Samples, route: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "idemproxy_proxy_responses_total" and dict(labels)["route"] == route and value
    }


def target(samples: Samples, name: str, upstream: str, label: str) -> dict[str, float]:
    """outcome -> value of idemproxy_upstream_requests_total for one target."""
    return {
        dict(labels).get("outcome", ""): value
        for (sample, labels), value in samples.items()
        if sample == name and dict(labels)["upstream"] == upstream and dict(labels)["target"] == label
    }


def refused_port() -> int:
    """A loopback port nothing listens on (connections are refused: nothing sent)."""
    return free_port()


async def test_proxy_made_answers_are_counted_by_reason_upstream_answers_are_not(
    aiohttp_client: Any, upstream: RecordingUpstream
) -> None:
    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503 if request.path == "/up/503" else 429)

    upstream.respond = unavailable
    dead = f"http://127.0.0.1:{refused_port()}"
    config = base_config(
        upstream.url,
        upstreams={
            "app": {"url": upstream.url},
            "dead": {"url": dead, "circuit_breaker": {"consecutive_failures": 1, "open_for": "1h"}},
        },
        routes=[
            {"name": "limited", "match": {"path_prefix": "/limited"}, "upstream": "app",
             "quota": {"rate": "1/h", "burst": 1}},
            {"name": "dead", "match": {"path_prefix": "/dead"}, "upstream": "dead"},
            {"name": "up", "match": {"path_prefix": "/up"}, "upstream": "app"},
        ],
    )
    seen = await observe(aiohttp_client, config)
    statuses = [
        (await seen.client.get(path)).status
        for path in ("/limited", "/limited", "/dead", "/dead", "/up/503", "/up/429", "/none")
    ]
    assert statuses == [429, 429, 502, 503, 503, 429, 404]
    await seen.lines.wait_for(7)
    samples = seen.samples()
    # The upstream's own 429 and 503 are not the proxy's; the quota's 429 is.
    assert proxy_made(samples, "limited") == {"quota": 1}
    assert proxy_made(samples, "up") == {}
    assert proxy_made(samples, "dead") == {"upstream_error": 1, "circuit_open": 1}
    assert proxy_made(samples, "") == {"no_route": 1}
    # Every reason exists at 0 for every route from the start (increase() sees the first one).
    assert ("idemproxy_proxy_responses_total", (("reason", "store_unavailable"), ("route", "up"))) in samples
    # Per target: attempts by answer class or failure; the circuit-open request sent nothing.
    app = target_label(upstream.url)
    assert target(samples, "idemproxy_upstream_requests_total", "app", app) == {
        "2xx": 0, "3xx": 0, "4xx": 2, "5xx": 1, "not_sent": 0, "ambiguous": 0,
    }
    assert target(samples, "idemproxy_upstream_requests_total", "dead", target_label(dead))["not_sent"] == 1
    assert samples[("idemproxy_upstream_request_duration_seconds_count", (("target", app), ("upstream", "app")))] == 3
    assert samples[("idemproxy_upstream_inflight_requests", (("target", app), ("upstream", "app")))] == 0


def test_every_error_type_maps_to_a_bounded_reason() -> None:
    assert proxy_reason("overloaded", 503, False) is ProxyReason.OVERLOAD
    assert proxy_reason("store_unavailable", 503, False) is ProxyReason.STORE_UNAVAILABLE
    assert proxy_reason("upstream_connect_timeout", 504, False) is ProxyReason.UPSTREAM_ERROR
    assert proxy_reason("idempotency_in_progress", 409, False) is ProxyReason.IDEMPOTENCY
    assert proxy_reason("request_body_too_large", 413, False) is ProxyReason.BAD_REQUEST
    assert proxy_reason("uri_too_long", 414, False) is ProxyReason.BAD_REQUEST
    assert proxy_reason("KeyError", 500, False) is ProxyReason.INTERNAL_ERROR
    assert proxy_reason(None, 200, True) is ProxyReason.REPLAY
    assert proxy_reason("something new", 503, False) is ProxyReason.OTHER


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("http://user:secret@api.internal:8443/v1?token=x", "api.internal:8443"),
        ("https://api.internal/v1", "api.internal:443"),
        ("http://api.internal", "api.internal:80"),
        ("http://[::1]:9000/", "[::1]:9000"),
    ],
)
def test_target_label_is_host_and_port_only(url: str, label: str) -> None:
    assert target_label(url) == label


async def test_inflight_by_upstream_and_target_while_a_request_waits(
    aiohttp_client: Any, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="done")

    upstream.respond = slow
    seen = await observe(aiohttp_client, base_config(upstream.url))
    seen.metrics.upstream_inflight = lambda: {
        name: u.inflight for name, u in seen.runtime.upstreams.items()
    }
    pending = asyncio.ensure_future(seen.client.get("/slow"))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    during = seen.samples()
    release.set()
    assert (await pending).status == 200
    label = target_label(upstream.url)
    assert during[("idemproxy_inflight_requests", (("upstream", "app"),))] == 1
    assert during[("idemproxy_inflight_requests", (("upstream", ""),))] == 0
    assert during[("idemproxy_upstream_inflight_requests", (("target", label), ("upstream", "app")))] == 1
    await seen.lines.wait_for(1)
    after = seen.samples()
    assert after[("idemproxy_upstream_inflight_requests", (("target", label), ("upstream", "app")))] == 0


def test_build_info_and_process_metrics_are_exposed(tmp_path: Any) -> None:
    from proxy.observability.metrics import Metrics

    families = {f.name: f for f in Metrics().registry.collect()}
    [build] = families["idemproxy_build_info"].samples
    assert build.labels == {"version": __version__, "python": platform.python_version()}
    assert build.value == 1
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
                 "process_cpu_seconds", "python_info"):
        assert name in families, name


@pytest.mark.slow
def test_supervisor_sums_process_metrics_of_its_workers(
    proxy_process: Any, upstream_process: Any
) -> None:
    config = base_config(upstream_process)
    config["workers"] = 2
    proxy = proxy_process(config)

    def scrape() -> Samples:
        import urllib.request

        with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    def both_workers() -> Samples | None:
        samples = scrape()
        return samples if samples.get(("idemproxy_workers", ())) == 2 else None

    samples = wait_until(both_workers, 20, "2 live workers")
    assert samples[("idemproxy_build_info", (("python", platform.python_version()), ("version", __version__)))] == 1
    rss = samples[("process_resident_memory_bytes", ())]
    fds = samples[("process_open_fds", ())]
    # Two Python processes with an event loop each: more than one alone could hold.
    assert rss > 2 * 15 * 2**20 and fds >= 2 * 5
    assert samples[("process_max_fds", ())] <= fds * 10**6
    assert samples[("process_start_time_seconds", ())] > 0


@pytest.fixture
def upstream_process() -> Any:
    """An upstream URL nothing needs to answer (the supervisor test only scrapes)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
