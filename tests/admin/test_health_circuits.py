"""/health shows each upstream target's weight and circuit state next to its active check, as
`proxy.server.serve` wires it: in-process for the states, and in a real `idemproxy run`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.admin.health import HealthMonitor, upstream_check
from proxy.config import parse
from proxy.pipeline.runtime import DataPlane
from proxy.server.wiring import target_states
from tests.conftest import MakeProxy
from tests.support.eventually import eventually
from tests.support.upstream import RecordingUpstream
from tests.upstream.test_breaker import breaker_config

Monitored = Callable[[dict[str, Any]], Awaitable[tuple[TestClient[web.Request, None], HealthMonitor]]]


async def failing(request: web.Request) -> web.Response:
    """503 for traffic, 200 for the active check: the circuit opens while the check passes."""
    return web.Response(status=200 if request.path == "/healthz" else 503)


@pytest.fixture
async def monitored(make_proxy: MakeProxy) -> AsyncIterator[Monitored]:
    """An in-process proxy and a HealthMonitor wired to its upstreams as the server wires them."""
    monitors: list[HealthMonitor] = []

    async def factory(
        config: dict[str, Any],
    ) -> tuple[TestClient[web.Request, None], HealthMonitor]:
        client = await make_proxy(config)
        plane: DataPlane = client.server.plane  # type: ignore[attr-defined]
        monitor = HealthMonitor()
        monitors.append(monitor)
        monitor.target_states = target_states(plane)
        await monitor.attach(parse(config, env={}), None)
        return client, monitor

    yield factory
    for monitor in monitors:
        await monitor.close()


async def open_circuit(client: TestClient[web.Request, None], requests: int) -> None:
    for _ in range(requests):
        await (await client.get("/x")).read()
    response = await client.get("/x")
    assert (await response.json())["type"].endswith(":circuit-open")


async def test_every_circuit_open_warns_without_a_health_block(
    monitored: Monitored, upstream: RecordingUpstream
) -> None:
    upstream.respond = failing
    client, monitor = await monitored(
        breaker_config([upstream.url], consecutive_failures=2, open_for="1m")
    )
    [target] = monitor.report()["checks"]["upstream:app"]
    assert (target["status"], target["circuitState"], target["weight"]) == ("pass", "closed", 1)
    assert target["componentId"] == upstream.url

    await open_circuit(client, 2)
    doc = monitor.report()
    [target] = doc["checks"]["upstream:app"]
    assert (target["status"], target["observedValue"], target["circuitState"]) == (
        "warn",
        "open",
        "open",
    )
    assert target["output"] == "every target's circuit is open"
    assert 0 < target["circuitRetryAfter"] <= 60
    assert doc["status"] == "warn", "an open circuit is not a readiness failure"
    assert doc["output"] == "attention: upstream:app"
    assert all(ok for _, ok in monitor.readiness())


async def test_weight_and_circuit_sit_next_to_the_active_check(
    monitored: Monitored, upstream: RecordingUpstream
) -> None:
    upstream.respond = failing
    config = breaker_config([upstream.url], consecutive_failures=2, open_for="1m")
    app = config["upstreams"]["app"]
    app["targets"] = [{"url": upstream.url, "weight": 2}]
    app["health"] = {"path": "/healthz", "interval": "50ms", "timeout": "500ms"}
    client, monitor = await monitored(config)

    async def checked() -> dict[str, Any] | None:
        [target] = monitor.report()["checks"]["upstream:app"]
        return target if target["observedValue"] is not None else None

    target = await eventually(checked, 5, "the target checked")
    assert (target["status"], target["weight"], target["circuitState"]) == ("pass", 2, "closed")

    await open_circuit(client, 2)
    [target] = monitor.report()["checks"]["upstream:app"]
    assert target["componentId"] == upstream.url + "/healthz"
    assert target["observedUnit"] == "ms", "the active check's result is kept"
    assert (target["status"], target["weight"], target["circuitState"]) == ("warn", 2, "open")
    assert target["output"] == "every target's circuit is open"
    assert monitor.upstream_up() == {"app": True}, "the check itself still passes"


async def test_health_shows_an_open_circuit_in_a_real_process(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    upstream.respond = failing
    proxy = proxy_process(breaker_config([upstream.url], consecutive_failures=2, open_for="1m"))
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(3):
            async with session.get(f"{proxy.url}/x") as response:
                statuses.append(response.status)
        assert statuses == [503, 503, 503]
        assert upstream.count == 2, "the third request met the open circuit"
        async with session.get(f"{proxy.admin_url}/health") as response:
            assert response.status == 200
            doc = orjson.loads(await response.read())
    assert doc["status"] == "warn"
    [target] = doc["checks"]["upstream:app"]
    assert (target["componentId"], target["circuitState"], target["status"]) == (
        upstream.url,
        "open",
        "warn",
    )
    assert target["output"] == "every target's circuit is open"


def test_a_drained_target_does_not_hide_that_every_serving_circuit_is_open() -> None:
    def target(url: str, weight: int, circuit: str | None) -> dict[str, object]:
        return {"url": url, "weight": weight, "healthy": True, "circuit": circuit,
                "retry_after": 5.0 if circuit == "open" else 0.0}

    blue, green = "http://127.0.0.1:1", "http://127.0.0.1:2"
    rendered = upstream_check(None, [target(blue, 1, "open"), target(green, 0, "closed")])
    assert [(t["componentId"], t["status"], t["weight"]) for t in rendered] == [
        (blue, "warn", 1),
        (green, "pass", 0),
    ]
    assert all(t["output"] == "every target's circuit is open" for t in rendered)
    assert rendered[0]["circuitRetryAfter"] == 5.0
    [plain] = upstream_check(None, [target(blue, 1, None)])
    assert plain["status"] == "pass" and "circuitState" not in plain and "output" not in plain
