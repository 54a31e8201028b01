"""A minimal StoreHealth over redis.asyncio, standing in for the idempotency store's own
ping/eviction_policy until the store branch is merged (health tests only need those two)."""

from __future__ import annotations

import time

import redis.asyncio as redis


class RedisHealth:
    def __init__(self, url: str, timeout: float = 0.5) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )

    async def ping(self) -> float:
        started = time.perf_counter()
        await self.client.ping()
        return time.perf_counter() - started

    async def eviction_policy(self) -> str | None:
        reply = await self.client.config_get("maxmemory-policy")
        return str(reply["maxmemory-policy"])

    async def close(self) -> None:
        await self.client.aclose()
