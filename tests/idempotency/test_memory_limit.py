"""store.max_bytes on a real `idemproxy run`: a caller flooding the memory store with large
responses does not make another caller's keyed requests fail, nothing runs twice, and the fill
level shows on /metrics."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.idempotency import idem_config
from tests.support.upstream import RecordingUpstream

MiB = 1024 * 1024
LARGE = 64 * 1024


def sized_responses(upstream: RecordingUpstream) -> Counter[str]:
    """The upstream answers `X-Size` bytes and counts executions per Idempotency-Key."""
    ledger: Counter[str] = Counter()

    async def respond(request: web.Request) -> web.Response:
        ledger[request.headers["Idempotency-Key"]] += 1
        return web.Response(body=b"x" * int(request.headers["X-Size"]))

    upstream.respond = respond
    return ledger


async def metrics(session: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    async with session.get(admin_url + "/metrics") as response:
        text = await response.text()
    return {
        sample.name + "".join(f"{{{k}={v}}}" for k, v in sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("idemproxy_store_memory")
    }


async def test_a_large_response_flood_cannot_lock_out_small_callers(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    ledger = sized_responses(upstream)
    config = idem_config(upstream.url, "memory://", store={"max_bytes": "1MiB"}, max_body="1MiB")
    proc = proxy_process(config)
    async with aiohttp.ClientSession() as session:

        async def post(key: str, size: int) -> tuple[int, dict[str, Any], bytes]:
            headers = {"Idempotency-Key": key, "X-Size": str(size)}
            async with session.post(proc.url + "/v1/pay", data=b"{}", headers=headers) as r:
                return r.status, dict(r.headers), await r.read()

        # Caller A: 32 large responses (2 MiB) into a 1 MiB store. Every one runs and is answered.
        for i in range(32):
            status, _, body = await post(f"a-{i}", LARGE)
            assert (status, len(body)) == (200, LARGE)
        # Caller B: small keyed requests still run, and their retries replay.
        for i in range(20):
            assert (await post(f"b-{i}", 300))[0] == 200
            status, headers, body = await post(f"b-{i}", 300)
            assert (status, headers.get("Idempotent-Replayed"), len(body)) == (200, "true", 300)
        # A's retries: replayed while they fitted, refused afterwards; none runs again.
        outcomes = Counter()
        for i in range(32):
            status, headers, body = await post(f"a-{i}", LARGE)
            if status == 200:
                assert headers.get("Idempotent-Replayed") == "true" and len(body) == LARGE
                outcomes["replayed"] += 1
            else:
                assert status == 422 and b"response-not-replayable" in body
                outcomes["not_replayable"] += 1
        assert outcomes["replayed"] and outcomes["not_replayable"]
        assert set(ledger.values()) == {1} and len(ledger) == 52  # never twice
        seen = await metrics(session, proc.admin_url)
    assert seen["idemproxy_store_memory_limit_bytes"] == MiB
    assert 0.75 * MiB * 0.9 < seen["idemproxy_store_memory_bytes"] <= MiB
    assert seen['idemproxy_store_memory_refusals_total{kind=response}'] == outcomes[
        "not_replayable"
    ]
    assert seen['idemproxy_store_memory_refusals_total{kind=claim}'] == 0
