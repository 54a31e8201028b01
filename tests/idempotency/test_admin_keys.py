"""Issue 13: an operator looks up and releases one key's record on the admin port of a real
`idemproxy run` (memory store, and `workers: 2` on Redis through the supervisor)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.eventually import eventually
from tests.support.idempotency import assert_problem, idem_config
from tests.support.proxy_process import ProxyProcess
from tests.support.redis_server import RedisServer
from tests.support.upstream import RecordingUpstream

StartProxy = Callable[..., ProxyProcess]
SCOPE = "sk_live_admin_test_secret"
KEY = "order-7-attempt"


def config(upstream: RecordingUpstream, store_url: str, **extra: Any) -> dict[str, Any]:
    settings = idem_config(upstream.url, store_url, upstream={"timeout": "300ms"},
                           scope={"header": "X-Api-Key"})
    settings.update(extra)
    return settings


def gated(upstream: RecordingUpstream) -> asyncio.Event:
    """Every request waits for the returned event, then answers 201 with its number."""
    gate = asyncio.Event()

    async def respond(request: web.Request) -> web.StreamResponse:
        number = upstream.count
        await gate.wait()
        return web.json_response({"execution": number}, status=201)

    upstream.respond = respond
    return gate


async def pay(session: aiohttp.ClientSession, proxy: ProxyProcess) -> aiohttp.ClientResponse:
    headers = {"Idempotency-Key": KEY, "X-Api-Key": SCOPE}
    async with session.post(proxy.url + "/v1/pay", json={"amount": 7}, headers=headers) as answer:
        await answer.read()
    return answer


async def admin(session: aiohttp.ClientSession, proxy: ProxyProcess, action: str,
                body: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{proxy.admin_url}/admin/keys/{action}", json=body,
                            headers=headers) as answer:
        if answer.content_type == "text/plain":
            return answer.status, {"text": await answer.text()}
        return answer.status, await answer.json(content_type=None)


TARGET = {"route": "payments", "key": KEY, "scope": SCOPE}


async def test_an_indeterminate_key_is_looked_up_released_and_then_runs(
    proxy_process: StartProxy, upstream: RecordingUpstream
) -> None:
    gate = gated(upstream)
    proxy = proxy_process(config(upstream, "memory://"))
    async with aiohttp.ClientSession() as session:
        assert (await pay(session, proxy)).status == 504  # timed out after sending: ambiguous
        gate.set()
        await assert_problem(await pay(session, proxy), 409, "outcome-indeterminate")

        status, record = await admin(session, proxy, "lookup", TARGET)
        assert status == 200
        assert record["state"] == "indeterminate"
        assert record["response"] is None
        assert record["fingerprint"]
        assert proxy.process is not None
        assert record["holder"].endswith(f"/{proxy.process.pid}")
        assert record["created"].endswith("Z")
        # The scope is part of the record id: another identity's record is not this one.
        status, missing = await admin(session, proxy, "lookup", {**TARGET, "scope": "other"})
        assert (status, missing["type"]) == (404, "urn:idemproxy:problem:admin-key-not-found")

        status, _ = await admin(session, proxy, "release", TARGET, Origin="https://evil.test")
        assert status == 403, "a browser page must not release keys"
        status, released = await admin(session, proxy, "release", TARGET)
        assert (status, released["released"]) == (200, True)
        assert released["record"]["state"] == "indeterminate"

        answer = await pay(session, proxy)
        assert answer.status == 201, "released: the retry runs"
        status, record = await admin(session, proxy, "lookup", TARGET)
        assert (record["state"], record["response"]["status"]) == ("completed", 201)
    assert upstream.count == 2

    async def released_events() -> list[dict[str, Any]]:
        return [e for e in proxy.json_lines() if e.get("event") == "idempotency_key_released"]

    (event,) = await eventually(released_events, 5, "the release event")
    assert (event["previous_state"], event["by"], event["level"]) == (
        "indeterminate", "admin", "warning"
    )
    assert SCOPE not in proxy.stdout() and KEY not in proxy.stdout()


async def test_a_live_holder_is_not_released_and_bad_requests_are_refused(
    proxy_process: StartProxy, upstream: RecordingUpstream
) -> None:
    gate = gated(upstream)
    settings = config(upstream, "memory://")
    settings["upstreams"]["app"]["timeout"] = "10s"
    proxy = proxy_process(settings)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(pay(session, proxy))
        await eventually(lambda: asyncio.sleep(0, upstream.count), 5, "the request upstream")
        status, body = await admin(session, proxy, "release", TARGET)
        assert (status, body["type"]) == (409, "urn:idemproxy:problem:admin-key-in-flight")
        status, record = await admin(session, proxy, "lookup", TARGET)
        assert (record["state"], record["lease_remaining_s"] > 0) == ("in_flight", True)
        gate.set()
        assert (await first).status == 201
        for body, expected in (
            ({"route": "nope", "key": KEY}, (404, "admin-route-unknown")),
            ({"route": "default", "key": KEY}, (404, "admin-route-unknown")),
            ({"route": "payments", "key": "has space"}, (400, "admin-request-invalid")),
            ({"route": "payments"}, (400, "admin-request-invalid")),
            ([1, 2], (400, "admin-request-invalid")),
        ):
            status, problem = await admin(session, proxy, "lookup", body)
            assert (status, problem["type"]) == (
                expected[0], f"urn:idemproxy:problem:{expected[1]}"
            )
        async with session.get(f"{proxy.admin_url}/admin/keys/lookup") as answer:
            assert answer.status == 405, "POST only: the scope value never goes in a URL"
    assert upstream.count == 1


async def test_the_supervisor_answers_for_its_workers(
    proxy_process: StartProxy, redis_server: Callable[..., RedisServer],
    upstream: RecordingUpstream,
) -> None:
    gated(upstream).set()
    proxy = proxy_process(config(upstream, redis_server().url, workers=2))
    async with aiohttp.ClientSession() as session:
        assert (await pay(session, proxy)).status == 201
        status, record = await admin(session, proxy, "lookup", TARGET)
        assert (status, record["state"], record["response"]["status"]) == (200, "completed", 201)
        status, released = await admin(session, proxy, "release", TARGET)
        assert (status, released["released"]) == (200, True)
        status, _ = await admin(session, proxy, "lookup", TARGET)
        assert status == 404
