"""`limits.max_connections`: a refused connection is counted and reported by a rate-limited
warning (the real-process contract is in tests/conformance/test_resource_bounds.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.observability import events, logsink
from proxy.server import listener as server
from tests.conftest import MakeProxy
from tests.support.lines import Lines
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

INTERVAL = 0.3


async def refused(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
    finally:
        writer.close()


async def test_refused_connections_count_and_warn_once_per_interval(
    make_proxy: MakeProxy, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "REJECTED_EVENT_INTERVAL", INTERVAL)
    reported = Lines()
    events.configure("info", reported)
    try:
        client = await make_proxy(base_config(upstream.url, limits={"max_connections": 1}))
        plane: Any = client.server.plane  # type: ignore[attr-defined]
        counter = plane.runtime.metrics.connections_rejected
        before = counter.value
        held = await client.get("/held")  # keeps the one allowed connection open
        assert held.status == 200
        for _ in range(3):
            answer = await refused(client.port)  # type: ignore[arg-type]
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too-many-connections" in answer
        assert counter.value == before + 3
        [first] = reported.json()
        assert (first["event"], first["level"], first["rejected"]) == (
            "connections_rejected",
            "warning",
            1,
        )
        assert first["max_connections"] == 1
        await asyncio.sleep(INTERVAL)  # the interval itself is what is under test
        await refused(client.port)  # type: ignore[arg-type]
        second = reported.json()[1]
        assert second["rejected"] == 3, "the two held back, plus this one"
        assert counter.value == before + 4
        held.release()
    finally:
        events.configure("info", logsink.STDOUT)
    lines = client.server.lines.json()  # type: ignore[attr-defined]
    assert [line["url.path"] for line in lines] == ["/held"], "refusals have no access line"
