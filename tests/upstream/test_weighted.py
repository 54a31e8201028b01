"""Weighted targets: smooth weighted round robin, weight 0 drains, health ejects and restores,
weights change by reload while requests on the old runtime finish."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from proxy.config import Upstream as UpstreamConfig
from proxy.config import parse
from proxy.pipeline.runtime import Runtime
from proxy.upstream.targets import Upstream
from tests.support.faults import hang_until
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream


@pytest.fixture
async def green(aiohttp_server: Any) -> RecordingUpstream:
    recording = RecordingUpstream()
    server = await aiohttp_server(recording.app)
    recording.url = str(server.make_url("")).rstrip("/")
    return recording


def weighted(urls_weights: list[tuple[str, int]]) -> dict[str, Any]:
    config = base_config(urls_weights[0][0])
    app = config["upstreams"]["app"]
    del app["url"]
    app["targets"] = [{"url": url, "weight": weight} for url, weight in urls_weights]
    return config


def picks(upstream: Upstream, count: int) -> Counter[str]:
    chosen = Counter[str]()
    for _ in range(count):
        target = upstream.pick()
        assert target is not None
        chosen[target.url] += 1
    return chosen


def make_upstream(weights: list[int]) -> Upstream:
    targets = [{"url": f"http://127.0.0.1:{9000 + i}", "weight": w} for i, w in enumerate(weights)]
    return Upstream("app", UpstreamConfig.model_validate({"targets": targets}))


async def test_smooth_weighted_round_robin_is_exact_and_interleaved() -> None:
    upstream = make_upstream([90, 10])
    a, b = (t.url for t in upstream.targets)
    assert picks(upstream, 2000) == {a: 1800, b: 200}
    upstream = make_upstream([5, 1, 1])
    order = [upstream.pick().url for _ in range(7)]  # type: ignore[union-attr]
    a, b, c = (t.url for t in upstream.targets)
    assert order == [a, a, b, a, c, a, a], "smooth: the heavy target is not picked 5 in a row"
    await upstream.close()


async def test_weight_zero_drains_and_health_ejects_then_restores() -> None:
    upstream = make_upstream([3, 1, 0])
    a, b, drained = (t.url for t in upstream.targets)
    assert picks(upstream, 400) == {a: 300, b: 100}
    upstream.set_target_healthy(0, False)
    assert picks(upstream, 100) == {b: 100}
    upstream.set_target_healthy(0, True)
    assert picks(upstream, 400) == {a: 300, b: 100}
    # With no healthy target left, health is ignored rather than failing every request.
    upstream.set_target_healthy(0, False)
    upstream.set_target_healthy(1, False)
    assert picks(upstream, 400) == {a: 300, b: 100}
    assert drained not in picks(upstream, 100)
    await upstream.close()


async def test_split_over_2000_requests_through_the_proxy(
    make_proxy: Any, upstream: RecordingUpstream, green: RecordingUpstream
) -> None:
    client = await make_proxy(weighted([(upstream.url, 9), (green.url, 1)]))

    async def one(i: int) -> int:
        response = await client.get(f"/{i}")
        await response.read()
        return response.status

    statuses: list[int] = []
    for start in range(0, 2000, 50):
        statuses += await asyncio.gather(*(one(i) for i in range(start, start + 50)))
    assert statuses == [200] * 2000
    assert (upstream.count, green.count) == (1800, 200)


async def test_reload_changes_weights_and_old_requests_finish(
    make_proxy: Any, upstream: RecordingUpstream, green: RecordingUpstream
) -> None:
    """Blue/green: blue serves, a reload moves all new traffic to green while a request that
    started on blue completes on the old runtime's connection."""
    release = asyncio.Event()
    upstream.respond = hang_until(release)
    client = await make_proxy(weighted([(upstream.url, 1), (green.url, 0)]))
    plane = client.server.plane
    old = plane.runtime
    in_flight = asyncio.create_task(client.get("/slow"))
    await upstream.arrived.wait()

    flipped = parse(weighted([(upstream.url, 0), (green.url, 1)]), env={})
    plane.runtime = Runtime(flipped, previous=old, log=client.server.lines)
    for i in range(5):
        assert (await client.get(f"/new{i}")).status == 200
    assert (upstream.count, green.count) == (1, 5)
    release.set()
    response = await in_flight
    assert response.status == 200
    assert await response.text() == "released"
    await old.close()


async def test_reload_keeps_health_and_circuit_of_unchanged_targets(
    upstream: RecordingUpstream, green: RecordingUpstream
) -> None:
    config = weighted([(upstream.url, 1), (green.url, 1)])
    config["upstreams"]["app"]["circuit_breaker"] = {"consecutive_failures": 1}
    old = Runtime(parse(config, env={}))
    blue = old.upstreams["app"].targets[0]
    blue.healthy = False
    assert blue.breaker is not None
    blue.breaker.release(blue.breaker.acquire(), True)
    config["upstreams"]["app"]["targets"][1]["weight"] = 3
    new = Runtime(parse(config, env={}), previous=old)
    assert new.upstreams["app"].targets[0].healthy is False
    assert new.upstreams["app"].circuit_states()[0] == (upstream.url, "open")
    assert new.upstreams["app"].targets[1].weight == 3
    await old.close()
    await new.close()
