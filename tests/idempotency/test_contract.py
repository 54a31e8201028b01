"""The idempotency contract over HTTP, against the memory store and a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from aiohttp import web

from proxy.idempotency.stage import lease_for
from tests.idempotency.conftest import IdemProxy
from tests.support.idempotency import assert_problem
from tests.support.upstream import RecordingUpstream

# 200 simultaneous claims on a shared 2-core machine can queue past the 250 ms default budget
# (they would get 503 store-unavailable, correctly); these tests are about one execution.
LOADED = {"timeout": "3s"}


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def created(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    response = web.Response(
        status=201,
        body=orjson.dumps({"id": str(uuid.uuid4()), "echo": body.decode()}),
        content_type="application/json",
    )
    response.headers["Location"] = "/v1/payments/1"
    response.headers["ETag"] = '"v1"'
    response.headers["Set-Cookie"] = "session=secret"
    response.headers["X-Custom"] = "kept"
    response.headers["X-Other"] = "dropped"
    return response


async def test_retry_replays_status_body_and_allowed_headers(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    upstream.respond = created
    proxy = await idem_proxy(replay_headers=["X-Custom"])
    headers = key()
    first = await proxy.post("/v1/payments", json={"amount": 5}, headers=headers)
    assert first.status == 201
    original = await first.read()
    assert "Idempotent-Replayed" not in first.headers

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    again = await proxy.post(
        "/v1/payments", json={"amount": 5}, headers={**headers, "X-Trace-Id": trace}
    )
    assert again.status == 201
    assert await again.read() == original
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Server"] == "idemproxy"
    assert again.headers["X-Trace-Id"] == trace
    assert again.headers["Location"] == "/v1/payments/1"
    assert again.headers["ETag"] == '"v1"'
    assert again.headers["Content-Type"] == "application/json"
    assert again.headers["X-Custom"] == "kept"
    assert "Set-Cookie" not in again.headers
    assert "X-Other" not in again.headers
    assert upstream.count == 1


@pytest.mark.parametrize("upstream_via", [None, "1.0 backend-cache"])
@pytest.mark.parametrize("replayed", [[], ["Via"]])
async def test_replay_carries_the_same_via_as_the_original(
    idem_proxy: IdemProxy, upstream: RecordingUpstream, upstream_via: str | None,
    replayed: list[str],
) -> None:
    """A replay passed through the proxy like the original did (RFC 9110 §7.6.3), whether or
    not the route stores the upstream's own Via."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=201, text="made")
        if upstream_via is not None:
            response.headers["Via"] = upstream_via
        return response

    upstream.respond = answer
    proxy = await idem_proxy(replay_headers=replayed)
    headers = key()
    first = await proxy.post("/v1/payments", data=b"x", headers=headers)
    again = await proxy.post("/v1/payments", data=b"x", headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.headers.getall("Via")[-1] == again.headers.getall("Via")[-1] == "1.1 idemproxy"
    if replayed or upstream_via is None:  # else the upstream's Via is not stored
        assert again.headers.getall("Via") == first.headers.getall("Via")
    assert upstream.count == 1


async def test_key_is_forwarded_unchanged(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    proxy = await idem_proxy()
    response = await proxy.post("/v1/x", data=b"a", headers={"Idempotency-Key": '"k-1"'})
    assert response.status == 200
    assert upstream.received[0].header("Idempotency-Key") == '"k-1"'
    assert upstream.received[0].body == b"a"


async def test_changed_body_path_or_method_is_422(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    proxy = await idem_proxy()
    headers = key()
    assert (await proxy.post("/v1/a", json={"n": 1}, headers=headers)).status == 200
    for response in (
        await proxy.post("/v1/a", json={"n": 2}, headers=headers),
        await proxy.post("/v1/b", json={"n": 1}, headers=headers),
        await proxy.patch("/v1/a", json={"n": 1}, headers=headers),
        await proxy.post("/v1/a?x=1", json={"n": 1}, headers=headers),
    ):
        await assert_problem(response, 422, "payload-mismatch")
    assert upstream.count == 1


async def test_reordered_json_still_matches(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    proxy = await idem_proxy()
    headers = {**key(), "Content-Type": "application/json"}
    first = await proxy.post("/v1/a", data=b'{"a": 1, "b": [1, 2]}', headers=headers)
    assert first.status == 200
    again = await proxy.post(
        "/v1/a",
        data=b'{"b":[1,2],"a":1}',
        headers={**headers, "Content-Type": "application/json; charset=utf-8"},
    )
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert upstream.count == 1


async def _gate(upstream: RecordingUpstream) -> asyncio.Event:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"done": True})

    upstream.respond = slow
    return gate


async def test_concurrent_duplicates_reject_and_execute_once(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    gate = await _gate(upstream)
    proxy = await idem_proxy(store=LOADED)
    headers = key()

    async def post() -> tuple[int, str | None]:
        response = await proxy.post("/v1/pay", json={"n": 1}, headers=headers)
        await response.read()
        return response.status, response.headers.get("Retry-After")

    tasks = [asyncio.create_task(post()) for _ in range(200)]
    await asyncio.wait_for(upstream.arrived.wait(), 10)
    # Everything but the one executing request answers without waiting for the upstream.
    while sum(t.done() for t in tasks) < 199:
        await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert not gate.is_set()
    gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(status for status, _ in results) == [200] + [409] * 199
    # Come back in a second for the replay, not after the whole (31 s) lease.
    assert all(retry == "1" for status, retry in results if status == 409)
    assert upstream.count == 1


async def test_concurrent_duplicates_wait_and_replay(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    gate = await _gate(upstream)
    proxy = await idem_proxy(store=LOADED, on_concurrent="wait", wait_timeout="10s")
    headers = key()

    async def post() -> tuple[int, bytes, bool]:
        response = await proxy.post("/v1/pay", json={"n": 1}, headers=headers)
        return response.status, await response.read(), "Idempotent-Replayed" in response.headers

    tasks = [asyncio.create_task(post()) for _ in range(200)]
    await asyncio.wait_for(upstream.arrived.wait(), 10)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert {status for status, _, _ in results} == {200}
    assert {body for _, body, _ in results} == {b'{"done": true}'}
    assert sum(replayed for _, _, replayed in results) == 199
    assert upstream.count == 1


async def test_wait_mode_gives_up_with_409_after_wait_timeout(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    gate = await _gate(upstream)
    proxy = await idem_proxy(on_concurrent="wait", wait_timeout="200ms")
    headers = key()
    first = asyncio.create_task(proxy.post("/v1/pay", json={}, headers=headers))
    await asyncio.wait_for(upstream.arrived.wait(), 10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    second = await proxy.post("/v1/pay", json={}, headers=headers)
    assert second.status == 409
    assert 0.15 < loop.time() - started < 5
    gate.set()
    assert (await first).status == 200
    assert upstream.count == 1


async def test_two_identities_with_one_key_run_separately(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    proxy = await idem_proxy(scope={"header": "Authorization"})
    headers = key()
    alice = await proxy.post("/v1/a", json={}, headers={**headers, "Authorization": "Bearer a"})
    bob = await proxy.post("/v1/a", json={}, headers={**headers, "Authorization": "Bearer b"})
    assert (alice.status, bob.status) == (200, 200)
    assert upstream.count == 2
    again = await proxy.post("/v1/a", json={}, headers={**headers, "Authorization": "Bearer a"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await alice.read()
    assert upstream.count == 2


async def test_expired_record_runs_again(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    proxy = await idem_proxy(ttl="300ms")
    headers = key()
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 200
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while upstream.count < 2:
        assert loop.time() < deadline, "the record never expired"
        response = await proxy.post("/v1/a", json={}, headers=headers)
        assert response.status == 200
        await asyncio.sleep(0.05)  # pacing of the polling loop, not synchronisation
    assert "Idempotent-Replayed" not in response.headers


@pytest.mark.parametrize("status", [500, 503, 408, 409, 425, 429])
async def test_retryable_answers_are_released(
    idem_proxy: IdemProxy, upstream: RecordingUpstream, status: int
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status if upstream.count == 1 else 201, text="x")

    upstream.respond = failing
    proxy = await idem_proxy()
    headers = key()
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == status
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 201
    replay = await proxy.post("/v1/a", json={}, headers=headers)
    assert (replay.status, replay.headers["Idempotent-Replayed"]) == (201, "true")
    assert upstream.count == 2


async def test_store_5xx_keeps_server_errors(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    upstream.respond = failing
    proxy = await idem_proxy(store_5xx=True)
    headers = key()
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 500
    replay = await proxy.post("/v1/a", json={}, headers=headers)
    assert (replay.status, await replay.text()) == (500, "boom")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert upstream.count == 1


async def test_client_errors_are_stored(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    async def invalid(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "card declined"}, status=402)

    upstream.respond = invalid
    proxy = await idem_proxy()
    headers = key()
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 402
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 402
    assert upstream.count == 1


async def test_upstream_timeout_holds_the_key_indeterminate_past_the_lease(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    """Issue 13: an ambiguous outcome is held for the retention, not released with the lease;
    retries are told it may or may not have run, with no Retry-After inviting a loop."""
    gate = await _gate(upstream)
    proxy = await idem_proxy(upstream_options={"timeout": "300ms"})
    headers = key()
    first = await proxy.post("/v1/a", json={}, headers=headers)
    assert first.status == 504
    gate.set()
    loop = asyncio.get_running_loop()
    past_lease = loop.time() + lease_for(0.3, 0.25) + 0.5
    while True:  # through the whole lease and beyond: never run again
        again = await proxy.post("/v1/a", json={}, headers=headers)
        problem = await assert_problem(again, 409, "outcome-indeterminate")
        assert "Retry-After" not in again.headers
        assert "may or may not have happened" in problem["detail"]
        assert "will not run it again" in problem["detail"]
        if loop.time() > past_lease:
            break
        await asyncio.sleep(0.2)  # pacing of the retries across the lease
    assert upstream.count == 1


async def test_release_after_lease_runs_an_indeterminate_key_again(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    """The opt-in keeps the old behaviour for upstreams that deduplicate themselves."""
    gate = await _gate(upstream)
    proxy = await idem_proxy(
        upstream_options={"timeout": "300ms"}, on_indeterminate="release_after_lease"
    )
    headers = key()
    first = await proxy.post("/v1/a", json={}, headers=headers)
    assert first.status == 504
    again = await proxy.post("/v1/a", json={}, headers=headers)
    await assert_problem(again, 409, "outcome-indeterminate")
    assert 1 <= int(again.headers["Retry-After"]) <= 3
    assert upstream.count == 1
    gate.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 6
    while (response := await proxy.post("/v1/a", json={}, headers=headers)).status == 409:
        assert loop.time() < deadline, "the indeterminate record outlived its lease"
        await asyncio.sleep(0.1)  # pacing of the polling loop
    assert response.status == 200
    assert upstream.count == 2


async def test_unreachable_upstream_releases_the_key(idem_proxy: IdemProxy) -> None:
    from tests.support.ports import free_port

    proxy = await idem_proxy(upstream_options={"url": f"http://127.0.0.1:{free_port()}"})
    headers = key()
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 502
    # Not sent: the retry is not refused as in progress or indeterminate.
    assert (await proxy.post("/v1/a", json={}, headers=headers)).status == 502


async def test_oversize_response_streams_and_is_not_replayable(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    big = b"x" * 5000

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big)

    upstream.respond = large
    proxy = await idem_proxy(max_body="1KiB")
    headers = key()
    first = await proxy.post("/v1/a", json={}, headers=headers)
    assert (first.status, await first.read()) == (200, big)
    again = await proxy.post("/v1/a", json={}, headers=headers)
    await assert_problem(again, 422, "response-not-replayable")
    assert upstream.count == 1


async def test_record_is_finalised_when_the_client_disconnects(
    idem_proxy: IdemProxy, upstream: RecordingUpstream
) -> None:
    gate = asyncio.Event()

    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first,")
        await gate.wait()
        await response.write(b"second")
        return response

    upstream.respond = streaming
    proxy = await idem_proxy()
    headers = key()
    first = await proxy.post("/v1/a", json={}, headers=headers)
    assert await first.content.readany() == b"first,"
    first.close()  # the client goes away mid-response
    gate.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (again := await proxy.post("/v1/a", json={}, headers=headers)).status == 409:
        assert loop.time() < deadline, "the record was never finalised"
        await asyncio.sleep(0.05)  # pacing of the polling loop
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == b"first,second"
    assert upstream.count == 1
