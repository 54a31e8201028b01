"""/live, /ready and /health in pass, warn and fail states, against a real redis-server and a
real upstream; the checks run in the background and the endpoints read their cached results."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.admin import health, probes
from proxy.admin.health import HealthMonitor
from proxy.admin.reloads import ReloadAttempt
from proxy.admin.thread import AdminThread
from proxy.config import Config, config_hash, parse
from proxy.config import Store as StoreConfig
from proxy.pipeline.runtime import admin_app
from proxy.stores import Store, open_store
from tests.support.eventually import eventually
from tests.support.ports import free_port
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

Admin = TestClient[web.Request, web.Application]
MakeAdmin = Callable[..., Awaitable[tuple[Admin, HealthMonitor]]]
FAST = {"path": "/healthz", "interval": "50ms", "timeout": "500ms"}


def config_for(upstream_url: str, check: dict[str, Any] | None = None, **over: Any) -> Config:
    data = base_config(upstream_url, **over)
    if check is not None:
        data["upstreams"]["app"]["health"] = check
    data.setdefault("health", {"store_interval": "50ms", "store_timeout": "500ms"})
    return parse(data, env={})


@pytest.fixture
async def make_admin(aiohttp_client: Any) -> AsyncIterator[MakeAdmin]:
    monitors: list[HealthMonitor] = []
    stores: list[Store] = []

    async def factory(config: Config, store: Store | None = None) -> tuple[Admin, HealthMonitor]:
        monitor = HealthMonitor()
        monitors.append(monitor)
        if store is not None:
            stores.append(store)
        await monitor.attach(config, store)
        client: Admin = await aiohttp_client(admin_app(probes.on_admin_port(probes.probes(monitor)), {}))
        return client, monitor

    yield factory
    for monitor in monitors:
        await monitor.close()
    for store in stores:
        await store.close()


def redis_store(url: str) -> Store:
    """The idempotency store itself: its ping and eviction_policy feed the checks."""
    return open_store(StoreConfig(url=url, timeout=0.5))


async def ready(client: Admin, verbose: bool = False) -> tuple[int, str]:
    response = await client.get("/ready?verbose" if verbose else "/ready")
    return response.status, await response.text()


async def health_doc(client: Admin) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health")
    assert response.content_type == "application/health+json"
    return response.status, orjson.loads(await response.read())


async def settled(client: Admin, status: str) -> dict[str, Any]:
    """Wait until /health reports `status` with every check observed at least once."""

    async def probe() -> dict[str, Any] | None:
        _, doc = await health_doc(client)
        pending = any(
            entry.get("output") == "not checked yet"
            for entries in doc["checks"].values()
            for entry in entries
        )
        return doc if doc["status"] == status and not pending else None

    return await eventually(probe, 5, f"/health {status}")


async def test_all_checks_pass(
    make_admin: MakeAdmin, upstream: RecordingUpstream, redis_server: Any
) -> None:
    config = config_for(upstream.url, FAST)
    client, _ = await make_admin(config, redis_store(redis_server().url))
    doc = await settled(client, "pass")

    assert await ready(client) == (200, "ok")
    status, text = await ready(client, verbose=True)
    assert status == 200
    assert text.splitlines() == [
        "[+]config ok",
        "[+]store ok",
        "[+]upstream:app ok",
        "[+]shutdown ok",
        "ready check passed",
    ]
    status, doc = await health_doc(client)
    assert status == 200
    assert doc["releaseId"] == config_hash(config)
    assert doc["version"]
    assert "output" not in doc
    assert set(doc["checks"]) == {
        "store:responseTime",
        "store:evictionPolicy",
        "upstream:app",
        "config:reload",
        "proxy:draining",
    }
    for key, entries in doc["checks"].items():
        for entry in entries:
            assert entry["status"] == "pass", key
            assert {"observedValue", "time"} <= set(entry), key
    ping = doc["checks"]["store:responseTime"][0]
    assert ping["observedUnit"] == "ms" and ping["observedValue"] >= 0
    assert doc["checks"]["store:evictionPolicy"][0]["observedValue"] == "noeviction"
    target = doc["checks"]["upstream:app"][0]
    assert target["componentId"] == upstream.url + "/healthz"
    assert target["observedUnit"] == "ms"
    assert doc["checks"]["config:reload"][0]["observedValue"] == config_hash(config)
    assert any(r.raw_path == "/healthz" for r in upstream.received)


async def test_live_never_touches_dependencies(make_admin: MakeAdmin, redis_server: Any) -> None:
    redis = redis_server()
    dead = f"http://127.0.0.1:{free_port()}"
    client, _ = await make_admin(config_for(dead, FAST), redis_store(redis.url))
    redis.stop()
    await settled(client, "fail")
    response = await client.get("/live")
    assert response.status == 200
    assert await response.text() == "ok"
    assert response.headers["Content-Type"].startswith("text/plain")


async def test_store_down_fails_ready_and_health_when_fail_closed(
    make_admin: MakeAdmin, upstream: RecordingUpstream, redis_server: Any
) -> None:
    redis = redis_server()
    client, _ = await make_admin(config_for(upstream.url), redis_store(redis.url))
    await settled(client, "pass")
    redis.stop()
    doc = await settled(client, "fail")

    status, text = await ready(client)
    assert status == 503
    assert "[-]store failed: reason withheld" in text.splitlines()
    assert text.splitlines()[-1] == "ready check failed"
    ping = doc["checks"]["store:responseTime"][0]
    assert ping["status"] == "fail"
    assert ping["output"]
    assert doc["output"] == "not ready: store"
    assert (await client.get("/health")).status == 503

    redis.start()  # same port: the next background check recovers without a restart
    await settled(client, "pass")
    assert await ready(client) == (200, "ok")


async def test_store_down_only_warns_when_fail_open(
    make_admin: MakeAdmin, upstream: RecordingUpstream, redis_server: Any
) -> None:
    redis = redis_server()
    config = config_for(upstream.url, store={"url": redis.url, "on_error": "fail_open"})
    client, _ = await make_admin(config, redis_store(redis.url))
    redis.stop()
    doc = await settled(client, "warn")
    assert doc["checks"]["store:responseTime"][0]["status"] == "fail"
    assert (await client.get("/health")).status == 200
    assert await ready(client) == (200, "ok")


async def test_eviction_policy_other_than_noeviction_warns(
    make_admin: MakeAdmin, upstream: RecordingUpstream, redis_server: Any
) -> None:
    redis = redis_server()
    redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    client, _ = await make_admin(config_for(upstream.url), redis_store(redis.url))
    doc = await settled(client, "warn")
    policy = doc["checks"]["store:evictionPolicy"][0]
    assert policy["status"] == "warn"
    assert policy["observedValue"] == "allkeys-lru"
    assert "evict" in policy["output"]
    assert await ready(client) == (200, "ok")


async def test_required_upstream_down_fails(
    make_admin: MakeAdmin, upstream: RecordingUpstream
) -> None:
    client, monitor = await make_admin(config_for(upstream.url, FAST))
    await settled(client, "pass")

    async def unhealthy(request: web.Request) -> web.Response:
        return web.Response(status=503)

    upstream.respond = unhealthy
    doc = await settled(client, "fail")
    assert doc["checks"]["upstream:app"][0]["output"] == "HTTP 503"
    status, text = await ready(client)
    assert status == 503
    assert "[-]upstream:app failed: reason withheld" in text
    assert monitor.upstream_up() == {"app": False}


async def test_optional_upstream_down_only_warns(make_admin: MakeAdmin) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client, monitor = await make_admin(config_for(dead, {**FAST, "required": False}))
    doc = await settled(client, "warn")
    target = doc["checks"]["upstream:app"][0]
    assert target["status"] == "fail"
    assert "connect" in target["output"].lower()
    assert await ready(client) == (200, "ok")
    assert monitor.upstream_up() == {"app": False}


async def test_draining_fails_ready_and_health(
    make_admin: MakeAdmin, upstream: RecordingUpstream
) -> None:
    client, monitor = await make_admin(config_for(upstream.url))
    await settled(client, "pass")
    monitor.draining = True
    status, text = await ready(client)
    assert status == 503
    assert "[-]shutdown failed: reason withheld" in text
    status, doc = await health_doc(client)
    assert status == 503
    assert doc["status"] == "fail"
    assert doc["checks"]["proxy:draining"][0] | {"time": None} == {
        "status": "fail",
        "componentType": "system",
        "observedValue": True,
        "time": None,
    }
    assert (await client.get("/live")).status == 200


async def test_failed_reload_warns_with_error_and_running_hash(
    make_admin: MakeAdmin, upstream: RecordingUpstream
) -> None:
    config = config_for(upstream.url)
    client, monitor = await make_admin(config)
    error = ["routes[0].upstream: unknown upstream 'ap' (did you mean 'app'?)"]
    monitor.reloads.record(
        ReloadAttempt(time.time(), "signal", "failure", config_hash(config), error)
    )
    status, doc = await health_doc(client)
    assert status == 200
    assert doc["status"] == "warn"
    check = doc["checks"]["config:reload"][0]
    assert check["status"] == "warn"
    assert check["output"] == error[0]
    assert check["observedValue"] == config_hash(config)
    assert check["history"][-1]["result"] == "failure"
    assert monitor.reloads.totals["failure"] == 1


async def test_checks_are_not_restarted_by_a_reload_that_keeps_them(
    make_admin: MakeAdmin, upstream: RecordingUpstream
) -> None:
    config = config_for(upstream.url, FAST)
    client, monitor = await make_admin(config)
    await settled(client, "pass")
    kept = monitor.upstreams["app"]
    await monitor.attach(config_for(upstream.url, FAST, limits={"max_request_body": "1KiB"}), None)
    assert monitor.upstreams["app"] is kept
    assert await ready(client) == (200, "ok")  # no flap while a new check would warm up
    await monitor.attach(config_for(upstream.url, {**FAST, "path": "/other"}), None)
    assert monitor.upstreams["app"] is not kept
    await monitor.attach(config_for(upstream.url), None)
    assert monitor.upstreams == {}


@pytest.mark.parametrize("on_data_port", [False, True])
async def test_probes_on_the_data_port_only_when_enabled(
    make_proxy: Any, upstream: RecordingUpstream, on_data_port: bool
) -> None:
    config = base_config(upstream.url, health={"on_data_port": on_data_port})
    client = await make_proxy(config)
    monitor = HealthMonitor()
    await monitor.attach(parse(config, env={}), None)
    client.server.plane.probes = probes.probes(monitor)
    try:
        for path in ("/live", "/ready", "/health"):
            response = await client.get(path)
            assert response.status == 200
            assert ("X-Trace-Id" in response.headers) is not on_data_port  # proxied or not
        post = await client.post("/ready")  # only GET and HEAD are probes
        assert post.status == 200
        forwarded = [r.raw_path for r in upstream.received]
        assert forwarded == (
            ["/ready"] if on_data_port else ["/live", "/ready", "/health", "/ready"]
        )
    finally:
        await monitor.close()


async def test_live_fails_when_the_main_loop_stops_turning(
    make_admin: MakeAdmin, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = await make_admin(config_for(upstream.url))
    assert (await client.get("/live")).status == 200
    monkeypatch.setattr(health, "LOOP_STALLED", 0.0)  # every heartbeat is now too old
    response = await client.get("/live")
    assert response.status == 503
    assert await response.text() == "event loop stalled\n"


async def test_admin_thread_answers_while_the_main_loop_is_blocked(
    upstream: RecordingUpstream,
) -> None:
    monitor = HealthMonitor()
    await monitor.attach(config_for(upstream.url), None)
    port = free_port()
    admin = AdminThread(admin_app(probes.on_admin_port(probes.probes(monitor)), {}), "127.0.0.1", port)
    await admin.start()
    try:
        answered: list[int] = []
        done = threading.Event()

        def probe() -> None:
            url = f"http://127.0.0.1:{port}/live"
            with urllib.request.urlopen(url, timeout=5) as response:
                answered.append(response.status)
            done.set()

        threading.Thread(target=probe).start()
        # Block this (the main) loop: only a probe served by another loop can get through.
        assert done.wait(5)
        assert answered == [200]
    finally:
        await admin.stop()
        await monitor.close()
