"""Span export against a real OTLP/HTTP receiver (an aiohttp server decoding the protobuf with
the official opentelemetry-proto package): the ids chain client -> proxy -> upstream, the
attributes, sampling, and a collector that is down (the proxy keeps serving, memory and the
queue stay bounded, every lost span is counted)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from aiohttp import ClientSession, web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, parse
from tests.support.eventually import eventually
from tests.support.ports import free_port, wait_until
from tests.support.proxy_process import REPO, ProxyProcess, base_config
from tests.support.upstream import RecordingUpstream

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP traces endpoint that keeps every span it decodes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.arrived = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self._export)

    async def _export(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "idemproxy"
                self.spans.extend((resource, span) for span in scope_spans.spans)
        self.arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_for(self, count: int, timeout: float = 10) -> list[Span]:
        async with asyncio.timeout(timeout):
            while len(self.spans) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return [span for _, span in self.spans]


def attributes(values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in values:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app)
    receiver.url = f"http://127.0.0.1:{server.port}/v1/traces"  # type: ignore[attr-defined]
    return receiver


def export_config(upstream_url: str, endpoint: str, **export: Any) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["tracing"] = {
        "export": {
            "endpoint": endpoint,
            "schedule_delay": "100ms",
            "resource_attributes": {"deployment.environment": "test"},
            **export,
        }
    }
    return config


def scrape(process: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(process.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_server_span_joins_the_trace_client_proxy_upstream(
    proxy_process: Any, upstream: RecordingUpstream, receiver: Receiver
) -> None:
    process = proxy_process(export_config(upstream.url, receiver.url))  # type: ignore[attr-defined]
    async with ClientSession() as session:
        async with session.post(
            process.url + "/orders/7?secret=x",
            data=b"{}",
            headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01", "tracestate": "rojo=1"},
        ) as response:
            assert response.status == 200
        async with session.get(process.url + "/fresh") as response:  # a trace that starts here
            assert response.status == 200
            fresh_trace = response.headers["X-Trace-Id"]
    [continued, started] = await receiver.wait_for(2)
    # The span's id is the parent id the upstream received: one unbroken chain.
    _, upstream_trace, upstream_parent, flags = upstream.received[0].header("traceparent").split("-")
    assert (upstream_trace, flags) == (TRACE, "01")
    assert continued.trace_id.hex() == TRACE
    assert continued.span_id.hex() == upstream_parent
    assert continued.parent_span_id.hex() == CLIENT_SPAN
    assert continued.trace_state == "rojo=1"
    assert continued.kind == Span.SPAN_KIND_SERVER
    assert continued.name == "POST default"
    assert continued.end_time_unix_nano > continued.start_time_unix_nano
    assert attributes(continued.attributes) == {
        "http.request.method": "POST",
        "url.path": "/orders/7",  # never the query string
        "url.scheme": "http",
        "http.route": "default",
        "http.response.status_code": 200,
        "server.address": "127.0.0.1",
        "server.port": process.port,
        "network.protocol.version": "1.1",
        "client.address": "127.0.0.1",
        "user_agent.original": continued_agent(attributes(continued.attributes)),
        "http.request.body.size": 2,
        "http.response.body.size": attributes(continued.attributes)["http.response.body.size"],
        "http.request.resend_count": 0,
        "upstream.name": "app",
        "upstream.target": upstream.url.removeprefix("http://"),
    }
    # A trace started by the proxy: no parent, and the upstream's parent is the exported span.
    assert started.trace_id.hex() == fresh_trace
    assert started.parent_span_id == b""
    assert upstream.received[1].header("traceparent").split("-")[2] == started.span_id.hex()
    resource = receiver.spans[0][0]
    assert resource["service.name"] == "idemproxy"
    assert resource["deployment.environment"] == "test"
    assert "secret" not in str(receiver.spans)
    # The exporter counts a batch when the receiver's answer is back, a moment after the
    # receiver has its spans: poll for the count rather than reading it once.

    async def both_exported() -> bool:
        samples = await asyncio.to_thread(scrape, process)
        return samples[("idemproxy_spans_exported_total", ())] >= 2

    await eventually(both_exported, 5, "both spans counted as exported")
    samples = await asyncio.to_thread(scrape, process)
    assert samples[("idemproxy_spans_exported_total", ())] == 2


def continued_agent(attrs: dict[str, Any]) -> str:
    agent = attrs["user_agent.original"]
    assert agent.startswith("Python/")  # aiohttp's default User-Agent
    return str(agent)


async def test_sampling_ratio_and_parent_decision(
    proxy_process: Any, upstream: RecordingUpstream, receiver: Receiver
) -> None:
    config = export_config(upstream.url, receiver.url, sampling_ratio=0)  # type: ignore[attr-defined]
    process = proxy_process(config)
    async with ClientSession() as session:
        for _ in range(5):  # new traces at ratio 0: none recorded, and sent on unsampled
            async with session.get(process.url + "/new") as response:
                assert response.status == 200
        headers = {"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}  # a sampled parent: recorded
        async with session.get(process.url + "/sampled", headers=headers) as response:
            assert response.status == 200
        headers = {"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-00"}  # an unsampled parent: not
        async with session.get(process.url + "/unsampled", headers=headers) as response:
            assert response.status == 200
    [span] = await receiver.wait_for(1)
    assert attributes(span.attributes)["url.path"] == "/sampled"
    assert [r.header("traceparent")[-2:] for r in upstream.received] == ["00"] * 5 + ["01", "00"]
    samples = await asyncio.to_thread(
        wait_until, lambda: (s := scrape(process))[("idemproxy_spans_exported_total", ())] and s,
        5, "the export counted",
    )
    assert len(receiver.spans) == 1
    assert samples[("idemproxy_spans_dropped_total", (("reason", "queue_full"),))] == 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_collector_down_the_proxy_keeps_serving_and_drops_are_counted(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens
    config = export_config(
        upstream.url, down, max_queue_size=100, max_export_batch_size=50, export_timeout="1s"
    )
    process = proxy_process(config)
    assert process.process is not None
    sent = 0

    async def burst(session: ClientSession, count: int) -> None:
        nonlocal sent
        for _ in range(count):
            async with session.get(process.url + "/x") as response:
                assert response.status == 200
            sent += 1

    async with ClientSession() as session:
        await asyncio.gather(*(burst(session, 100) for _ in range(4)))  # warm up
        before = rss_kib(process.process.pid)
        await asyncio.gather(*(burst(session, 500) for _ in range(4)))
        after = rss_kib(process.process.pid)
    # Every span is queued, dropped or failed; the queue never holds more than its bound.
    samples = await asyncio.to_thread(scrape, process)
    dropped = samples[("idemproxy_spans_dropped_total", (("reason", "queue_full"),))]
    failed = samples[("idemproxy_spans_dropped_total", (("reason", "export_failed"),))]
    assert samples[("idemproxy_spans_exported_total", ())] == 0
    assert dropped > 0
    assert sent - 100 - 50 <= dropped + failed <= sent
    # 2,000 more requests with the collector down: memory did not grow with them.
    assert after - before < 8 * 1024, (before, after)


def test_export_config_is_strict_and_names_the_path() -> None:
    config = base_config("http://127.0.0.1:1")
    config["tracing"] = {"export": {"sampling_ratio": 2}}
    with pytest.raises(ConfigError, match=r"tracing\.export\.sampling_ratio"):
        parse(config, env={})
    config["tracing"] = {"export": {"endpont": "http://x"}}
    with pytest.raises(ConfigError, match=r"tracing\.export\.endpont"):
        parse(config, env={})
    config["tracing"] = {"export": {"endpoint": "http://collector:4318/v1/traces"}}
    assert parse(config, env={}).tracing.export is not None


BLOCK_OTEL = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
"""


def test_without_the_extra_the_proxy_runs_and_export_fails_clearly(tmp_path: Any) -> None:
    """The extra is not installed (its imports fail): the proxy imports, loads a config without
    export, and a config that enables export is refused with the install command."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_OTEL)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    plain = tmp_path / "plain.yaml"
    plain.write_text("upstreams: {app: {url: 'http://127.0.0.1:1'}}\nroutes: [{name: r, upstream: app}]\n")
    exporting = tmp_path / "export.yaml"
    exporting.write_text(plain.read_text() + "tracing: {export: {endpoint: 'http://c:4318/v1/traces'}}\n")

    def check(path: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "check", "--config", str(path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )

    assert check(plain).returncode == 0
    refused = check(exporting)
    assert refused.returncode != 0
    assert "tracing.export" in refused.stderr + refused.stdout
    assert "pip install 'idemproxy[otel]'" in refused.stderr + refused.stdout
