"""Resilience together with idempotency: a retried keyed POST still executes once, and an
open circuit or shed request leaves no claim behind."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.faults import hang_until, poll_status, refusing_url, status
from tests.support.idempotency import assert_problem, idem_config
from tests.support.upstream import RecordingUpstream, echo


def config(urls: list[str], **upstream: Any) -> dict[str, Any]:
    data = idem_config(urls[0], "memory://")
    app = data["upstreams"]["app"]
    del app["url"]
    app["targets"] = [{"url": url} for url in urls]
    app.update(upstream)
    data["routes"][0]["retries"] = {"attempts": 3, "backoff": "1ms", "on": ["not_sent", 503]}
    return data


async def test_keyed_post_is_resent_after_not_sent_and_executes_once(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    client = await make_proxy(config([refusing_url(), upstream.url]))
    headers = {"Idempotency-Key": "order-1", "Content-Type": "application/json"}
    first = await client.post("/v1/pay", data=b'{"amount": 5}', headers=headers)
    assert first.status == 200
    assert upstream.count == 1
    again = await client.post("/v1/pay", data=b'{"amount": 5}', headers=headers)
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert upstream.count == 1, "the client's retry is a replay, not a second execution"


async def test_keyed_post_answered_503_is_not_resent(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    upstream.respond = status(503)
    client = await make_proxy(config([upstream.url]))
    response = await client.post("/v1/pay", data=b"{}", headers={"Idempotency-Key": "order-2"})
    assert response.status == 503
    assert upstream.count == 1, "503 is opted in for GETs only: the POST may have executed"


async def test_open_circuit_releases_the_claim(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    upstream.respond = status(503)
    breaker = {"consecutive_failures": 1, "open_for": "200ms"}
    client = await make_proxy(config([upstream.url], circuit_breaker=breaker))
    assert (await client.get("/v1/warm")).status == 503  # opens the circuit
    assert upstream.count == 1, "the GET's 503 retry met the open circuit"
    headers = {"Idempotency-Key": "order-3"}
    response = await client.post("/v1/pay", data=b"{}", headers=headers)
    await assert_problem(response, 503, "circuit-open")
    upstream.respond = echo
    response = await poll_status(client, 200, "POST", "/v1/pay", data=b"{}", headers=headers)
    assert "Idempotent-Replayed" not in response.headers, "released, so executed, not replayed"
    assert upstream.count == 2


async def test_a_shed_request_claims_nothing(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()
    upstream.respond = hang_until(release)
    client = await make_proxy(config([upstream.url], max_inflight=1))
    held = asyncio.create_task(client.get("/v1/slow"))
    await upstream.arrived.wait()
    headers = {"Idempotency-Key": "order-4"}
    await assert_problem(await client.post("/v1/pay", data=b"{}", headers=headers), 503,
                         "overloaded")
    release.set()
    assert (await held).status == 200
    upstream.respond = echo
    response = await client.post("/v1/pay", data=b"{}", headers=headers)
    assert response.status == 200, "no claim was left behind by the shed attempt"
    assert upstream.count == 2
