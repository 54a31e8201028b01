"""Load shedding: beyond `max_inflight` the proxy answers 503 at once instead of queueing,
and the admitted requests are not slowed by the excess."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from tests.support.faults import hang_until
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream


async def test_excess_gets_503_fast_while_admitted_requests_finish(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()
    upstream.respond = hang_until(release)
    config = base_config(upstream.url)
    config["upstreams"]["app"]["max_inflight"] = 2
    client = await make_proxy(config)
    admitted = [asyncio.create_task(client.get(f"/slow{i}")) for i in range(2)]
    while upstream.count < 2:
        upstream.arrived.clear()
        await asyncio.wait_for(upstream.arrived.wait(), 5)
    assert client.server.plane.runtime.upstreams["app"].inflight == 2

    started = time.monotonic()
    shed = await asyncio.gather(*(client.get(f"/excess{i}") for i in range(20)))
    elapsed = time.monotonic() - started
    assert [r.status for r in shed] == [503] * 20
    body = await shed[0].json()
    assert body["type"].endswith(":overloaded")
    assert shed[0].headers["Retry-After"] == "1"
    assert elapsed < 1.0, "excess is answered at once, not queued"
    assert upstream.count == 2, "shed requests never reach the upstream"

    release.set()
    assert [(await task).status for task in admitted] == [200, 200]
    assert client.server.plane.runtime.upstreams["app"].inflight == 0
    assert (await client.get("/after")).status == 200


async def test_admitted_latency_stays_bounded_under_excess(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    """A slow upstream (100 ms) with room for 4: a burst of 40 sheds 36 immediately and the 4
    admitted ones take about the upstream's own time, not the burst's."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.1)  # the upstream's service time, not synchronisation
        return web.Response(text="ok")

    upstream.respond = slow
    config = base_config(upstream.url)
    config["upstreams"]["app"]["max_inflight"] = 4
    client = await make_proxy(config)

    async def timed(i: int) -> tuple[int, float]:
        started = time.monotonic()
        response = await client.get(f"/{i}")
        await response.read()
        return response.status, time.monotonic() - started

    results = await asyncio.gather(*(timed(i) for i in range(40)))
    admitted = [t for status, t in results if status == 200]
    shed = [t for status, t in results if status == 503]
    assert len(admitted) + len(shed) == 40
    assert 1 <= len(admitted) <= 8
    assert max(admitted) < 1.5, "admitted requests wait for the upstream, not for the burst"
