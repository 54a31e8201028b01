"""Rejections and the context fields the access log reads (memory store, in-process)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from proxy.config import parse
from proxy.http.context import RequestContext, UpstreamOutcome
from proxy.http.response import Response, StreamResponse
from proxy.idempotency import stage
from proxy.idempotency.keys import KeyHasher
from proxy.stores import MemoryStore, Store
from proxy.stores.base import Lease, StoreError
from tests.conftest import MakeProxy
from tests.support.idempotency import assert_problem, idem_config
from tests.support.requests import make_request
from tests.support.upstream import RecordingUpstream


class BrokenStore(MemoryStore):
    async def claim(self, key: str, token: str, fingerprint: str, lease: Lease) -> None:
        raise StoreError("store is down")


async def fake_forward(ctx: RequestContext) -> StreamResponse:
    """Stands in for forward.py: an answered exchange, fed to the tap."""
    ctx.upstream_outcome = UpstreamOutcome.ANSWERED
    if ctx.tap is not None:
        ctx.tap.start(201, [("Content-Type", "text/plain")])
        ctx.tap.feed(b"ok")
    return Response(status=201, body=b"ok", content_type="text/plain")


Send = Callable[..., Awaitable[StreamResponse]]


@pytest.fixture
async def staged() -> AsyncIterator[Callable[..., tuple[Send, list[RequestContext]]]]:
    """One idempotency stage over `fake_forward`, called with parsed requests (no socket);
    returns a sender and the contexts it saw."""
    stores: list[Store] = []

    def factory(store: Store | None = None, on_error: str = "fail_closed",
                **policy: Any) -> tuple[Send, list[RequestContext]]:
        config = parse(idem_config("http://127.0.0.1:1", "memory://",
                                   store={"on_error": on_error}, **policy), env={})
        store = MemoryStore(100) if store is None else store
        stores.append(store)
        handler = stage.IdempotencyStage(fake_forward, route=config.routes[0], store=store,
                              store_config=config.store, limits=config.limits,
                              hasher=KeyHasher("salt"), lease=5)
        contexts: list[RequestContext] = []

        async def send(method: str, path: str, body: bytes = b"",
                       headers: dict[str, str] | None = None) -> StreamResponse:
            raw = tuple((k.encode(), v.encode()) for k, v in (headers or {}).items())
            request = make_request(method, path, raw, body)
            ctx = RequestContext(request, "127.0.0.1", trace_id="1" * 32, path=path)
            contexts.append(ctx)
            return await handler(ctx)

        return send, contexts

    yield factory
    for store in stores:
        await store.close()


def problem_slug(response: StreamResponse) -> str:
    assert isinstance(response, Response)
    assert response.headers["Content-Type"] == "application/problem+json"
    return str(orjson.loads(response.body)["type"]).rsplit(":", 1)[-1]


async def test_outcomes_and_hashes_on_the_context(staged: Any) -> None:
    send, contexts = staged(scope={"header": "Authorization"})
    headers = {"Idempotency-Key": "k1", "Authorization": "Bearer secret"}
    await send("POST", "/v1/a", b"1", headers)
    await send("POST", "/v1/a", b"1", headers)
    await send("POST", "/v1/a", b"2", headers)
    await send("POST", "/v1/a", b"1")
    await send("GET", "/v1/a", headers=headers)
    miss, replay, mismatch, _bypass, get = contexts
    assert [c.idempotency_outcome for c in contexts] == [
        "miss", "replay", "mismatch", "bypass", None
    ]
    assert miss.idempotency_key_hash == replay.idempotency_key_hash
    assert miss.idempotency_key_hash is not None
    assert len(miss.idempotency_key_hash) == 16
    assert miss.user_hash is not None
    assert "secret" not in miss.user_hash
    assert (replay.status, replay.response_body_size) == (201, 2)
    assert mismatch.error_type == "idempotency_mismatch"
    assert get.idempotency_key_hash is None


async def test_store_failure_fail_closed_is_503_with_retry_after(staged: Any) -> None:
    send, contexts = staged(store=BrokenStore(10))
    response = await send("POST", "/v1/a", b"1", {"Idempotency-Key": "k"})
    assert (response.status, problem_slug(response)) == (503, "store-unavailable")
    assert response.headers["Retry-After"] == "1"
    assert (contexts[0].idempotency_outcome, contexts[0].error_type) == (
        "store_error", "store_unavailable"
    )
    # Unkeyed requests do not touch the store.
    assert (await send("POST", "/v1/a", b"1")).status == 201


async def test_store_failure_fail_open_forwards_unprotected(staged: Any) -> None:
    send, contexts = staged(store=BrokenStore(10), on_error="fail_open")
    response = await send("POST", "/v1/a", b"1", {"Idempotency-Key": "k"})
    assert response.status == 201
    assert (contexts[0].idempotency_outcome, contexts[0].error_type) == (
        "store_error", "store_unavailable"
    )


async def test_missing_key_on_a_required_route_is_400(
    make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, "memory://", required=True))
    await assert_problem(await proxy.post("/v1/a", json={}), 400, "key-missing")
    assert (await proxy.get("/v1/a")).status == 200  # GET is not an idempotent method here
    assert upstream.count == 1


async def test_optional_route_without_a_key_passes_through(
    make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, "memory://"))
    for _ in range(2):
        response = await proxy.post("/v1/a", json={})
        assert response.status == 200
        assert "Idempotent-Replayed" not in response.headers
    assert upstream.count == 2


@pytest.mark.parametrize(
    "headers",
    [
        {"Idempotency-Key": "has space"},
        {"Idempotency-Key": "x" * 256},
        {"Idempotency-Key": '"unterminated'},
        {"Idempotency-Key": ""},
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    ],
)
async def test_malformed_key_is_400(
    make_proxy: MakeProxy, upstream: RecordingUpstream, headers: Any
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, "memory://"))
    await assert_problem(await proxy.post("/v1/a", json={}, headers=headers), 400, "key-invalid")
    assert upstream.count == 0


async def test_methods_outside_the_policy_are_not_deduplicated(
    make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, "memory://", methods=["POST"]))
    for _ in range(2):
        assert (await proxy.put("/v1/a", json={}, headers={"Idempotency-Key": "k"})).status == 200
    assert upstream.count == 2


async def test_keyed_body_over_the_limit_is_413(
    make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    config = idem_config(upstream.url, "memory://")
    config["limits"] = {"max_request_body": "1KiB"}
    proxy = await make_proxy(config)

    async def chunks() -> Any:
        for _ in range(4):
            yield b"x" * 512

    response = await proxy.post("/v1/a", data=chunks(), headers={"Idempotency-Key": "k"})
    await assert_problem(response, 413, "body-too-large")
    assert upstream.count == 0


async def test_memory_store_full_fails_closed(
    make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, "memory://", store={"max_records": 1}))
    assert (await proxy.post("/v1/a", json={}, headers={"Idempotency-Key": "k1"})).status == 200
    response = await proxy.post("/v1/a", json={}, headers={"Idempotency-Key": "k2"})
    await assert_problem(response, 503, "store-unavailable")
    assert upstream.count == 1
