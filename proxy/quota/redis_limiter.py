"""GCRA in Redis (see proxy/quota/limiter.py for the algorithm): its own module, imported only
when a quota runs on a Redis store, so a memory-store sidecar never loads redis-py."""

from __future__ import annotations

import asyncio

from proxy.quota.limiter import Decision, QuotaStoreError, decide
from proxy.redis.scripts import STORE_FAILURES, Script, runner_for

_REDIS_STEP = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tonumber(ARGV[2]) * interval then
  return {0, tat - now}
end
local ttl = math.ceil((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%d', ttl))
return {1, new_tat - now}
""")


class RedisLimiter:
    """GCRA in Redis: one Lua script per request, server time in microseconds. `timeout`
    bounds each check (client retries included) so a stalled Redis costs at most that."""

    def __init__(self, url: str, timeout: float) -> None:
        self._runner = runner_for(url, timeout)
        self._timeout = timeout

    async def acquire(self, key: str, interval: float, burst: int) -> Decision:
        step = max(1, round(interval * 1_000_000))
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._runner.evaluate(_REDIS_STEP, key, [step, burst])
        except STORE_FAILURES as exc:
            raise QuotaStoreError(f"quota store: {exc or type(exc).__name__}") from exc
        allowed, ahead = reply
        return decide(bool(allowed), int(ahead) / 1_000_000, step / 1_000_000, burst)

    async def close(self) -> None:
        await self._runner.close()
