"""The core contract against Redis Sentinel (with a failover) and a 3-node Redis Cluster."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.stores.redis import RedisStore
from tests.conftest import MakeProxy
from tests.support.idempotency import assert_problem, idem_config
from tests.support.redis_topologies import Cluster, Sentinels
from tests.support.upstream import RecordingUpstream

Client = TestClient[web.Request, None]


async def core_cases(proxy: Client, upstream: RecordingUpstream) -> list[str]:
    """Replay, mismatch and one execution for concurrent duplicates; returns the keys used."""
    keys = [str(uuid.uuid4()) for _ in range(12)]
    for key in keys:
        headers = {"Idempotency-Key": key}
        first = await proxy.post("/v1/a", json={"k": key}, headers=headers)
        assert first.status == 200
        replay = await proxy.post("/v1/a", json={"k": key}, headers=headers)
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert await replay.read() == await first.read()
        await assert_problem(await proxy.post("/v1/a", json={}, headers=headers), 422,
                             "payload-mismatch")
    assert upstream.count == len(keys)

    headers = {"Idempotency-Key": str(uuid.uuid4())}
    responses = await asyncio.gather(
        *(proxy.post("/v1/b", json={}, headers=headers) for _ in range(50))
    )
    # Duplicates that overlap the original get 409; later ones get the replay.
    fresh = [r for r in responses if r.status == 200 and "Idempotent-Replayed" not in r.headers]
    assert len(fresh) == 1
    assert all(r.status in (200, 409) for r in responses)
    assert upstream.count == len(keys) + 1
    return keys


async def test_sentinel_core_cases_and_failover(
    redis_sentinels: Sentinels, make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, redis_sentinels.url,
                                         store={"timeout": "500ms"}))
    keys = await core_cases(proxy, upstream)
    primary = redis_sentinels.primary
    assert primary.cli("WAIT", "1", "2000") == "1"  # the records reached the replica
    executed = upstream.count
    redis_sentinels.failover()
    assert redis_sentinels.primary_port() == redis_sentinels.replica.port
    for key in keys:
        # Sentinel killed the connections to the demoted primary; the pool replaces them with
        # connections to the new one within the request: no 503.
        response = await proxy.post("/v1/a", json={"k": key}, headers={"Idempotency-Key": key})
        assert response.status == 200, await response.text()
        assert response.headers["Idempotent-Replayed"] == "true"
    assert upstream.count == executed  # replicated records survived the failover
    fresh = await proxy.post("/v1/a", json={}, headers={"Idempotency-Key": "after-failover"})
    assert fresh.status == 200
    assert upstream.count == executed + 1


async def test_cluster_core_cases_across_slots(
    redis_cluster: Cluster, make_proxy: MakeProxy, upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(idem_config(upstream.url, redis_cluster.url))
    await core_cases(proxy, upstream)
    holding = [node for node in redis_cluster.nodes if int(node.cli("DBSIZE")) > 0]
    assert len(holding) >= 2  # the records spread over the cluster's slots
    store = RedisStore.from_url(redis_cluster.url, 0.5)
    try:
        assert await store.eviction_policy() == "noeviction"
    finally:
        await store.close()
