"""Issue 13: the record is committed before the last byte of the response reaches the client,
so a retry sent the moment the client has its answer is a replay, never `409 in-progress`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.config import parse
from proxy.pipeline.runtime import DataPlane, Runtime
from proxy.stores import MemoryStore
from proxy.stores.base import StoredResponse
from tests.conftest import ProxyTestServer
from tests.support.idempotency import idem_config
from tests.support.lines import Lines
from tests.support.upstream import RecordingUpstream

# The store's latency on finalising: far longer than a loopback round trip, so without the
# commit-before-last-byte the client's immediate retry always overtakes the commit.
COMMIT_LATENCY = 0.3


class SlowCommitStore(MemoryStore):
    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        await asyncio.sleep(COMMIT_LATENCY)  # injected store latency, not synchronisation
        return await super().complete(key, token, response, ttl)

    async def release(self, key: str, token: str) -> bool:
        await asyncio.sleep(COMMIT_LATENCY)
        return await super().release(key, token)


Client = TestClient[web.Request, None]


@pytest.fixture
async def slow_commit_proxy(
    aiohttp_client: Any, upstream: RecordingUpstream
) -> AsyncIterator[Callable[..., Any]]:
    runtimes: list[Runtime] = []

    async def factory(**policy: Any) -> Client:
        config = parse(idem_config(upstream.url, "memory://", **policy), env={})
        runtime = Runtime(config, SlowCommitStore(1000), log=Lines())
        runtimes.append(runtime)
        client: Client = await aiohttp_client(ProxyTestServer(DataPlane(runtime), Lines()))
        return client

    yield factory
    for runtime in runtimes:
        await runtime.close()
        await runtime.store.close()


def whole(status: int) -> Callable[[web.Request], Any]:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=b'{"id":1}', content_type="application/json")

    return respond


def streamed(chunked: bool) -> Callable[[web.Request], Any]:
    """A body in several writes: with Content-Length or chunked."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=201)
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = 3 * 40_000
        await response.prepare(request)
        for part in (b"a", b"b", b"c"):
            await response.write(part * 40_000)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    return respond


@pytest.mark.parametrize(
    ("respond", "replayed"),
    [(whole(201), True), (streamed(False), True), (streamed(True), True), (whole(503), False)],
    ids=["whole-body", "content-length-stream", "chunked-stream", "released-503"],
)
async def test_an_immediate_retry_finds_the_record(
    slow_commit_proxy: Callable[..., Any], upstream: RecordingUpstream,
    respond: Callable[[web.Request], Any], replayed: bool,
) -> None:
    upstream.respond = respond
    proxy = await slow_commit_proxy()
    url = str(proxy.make_url("/v1/pay"))
    headers = {"Idempotency-Key": "commit-1"}
    # A connection per request, as a client with a pool: on one keep-alive connection the
    # server would not read the retry before the first handler returned.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(url, json={}, headers=headers) as first:
            body = await first.read()
        async with session.post(url, json={}, headers=headers) as retry:  # at once: no pause
            assert retry.status == first.status, await retry.text()
            assert await retry.read() == body
    if replayed:
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert upstream.count == 1
    else:
        assert upstream.count == 2, "a released 5xx runs again, without a 409 first"
