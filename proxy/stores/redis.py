"""Redis record store: one string per record under `idem:v1:{<key>}` (the hash tag keeps every
script on one Cluster slot; the layout and the scripts are `redis_record`), each transition one
Lua script with compare-and-set on the owner token; expiry (`PX`) and lease deadlines (`TIME`)
by the server, never by the proxy's clock.

Every operation is bounded by the store budget as a whole. The scripts are idempotent for
their owner, so the one reconnect-retry of either client (which re-sends the command) is harmless
and a claim whose reply was lost is recognised when it is repeated or read back. How the scripts
reach Redis is `proxy.redis.scripts`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.redis.resp import Arg, RespError
from proxy.redis.scripts import STORE_FAILURES, Script, ScriptRunner, runner_for
from proxy.stores.base import (
    Lease,
    Record,
    RecordState,
    StoredResponse,
    StoreError,
    StoreTimeout,
)
from proxy.stores.redis_record import (
    CLAIM,
    COMPLETE,
    COMPLETED_CODE,
    DISCARD,
    GET,
    RELEASE,
    STATE_CODES,
    flagged,
    parse_record,
)

# The key namespace, not the record layout: records of every schema live under the same keys,
# so a rolling upgrade finds every record the old version wrote.
KEY_PREFIX = "idem:v1:"


def redis_key(key: str) -> str:
    return f"{KEY_PREFIX}{{{key}}}"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    def __init__(self, runner: ScriptRunner, budget: float) -> None:
        self.runner = runner
        self.budget = budget

    @classmethod
    def from_url(cls, url: str, budget: float) -> RedisStore:
        return cls(runner_for(url, budget), budget)

    def _failure(self, exc: BaseException) -> StoreError:
        if isinstance(exc, (TimeoutError, RedisTimeoutError)):
            return StoreTimeout(f"redis did not answer within {self.budget:g}s")
        return StoreError(f"redis: {exc or type(exc).__name__}")

    async def _run(self, coro: Any) -> Any:
        """A call that is not a script (ping, config) within the budget."""
        try:
            async with asyncio.timeout(self.budget):
                return await coro
        except (RedisTimeoutError, *STORE_FAILURES) as exc:
            raise self._failure(exc) from exc

    async def _evaluate(
        self, script: Script, key: str, args: Sequence[Arg] = (), deadline: float | None = None
    ) -> Any:
        """A script, answered by `deadline` (default: the budget from now); the runner bounds
        it (our RESP client without a timer per command)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.budget
        try:
            return await self.runner.evaluate(script, redis_key(key), args, deadline)
        except (RedisTimeoutError, *STORE_FAILURES) as exc:
            raise self._failure(exc) from exc

    async def claim(self, key: str, token: str, fingerprint: str, lease: Lease) -> Record | None:
        deadline = asyncio.get_running_loop().time() + self.budget
        args: list[Arg] = [
            token,
            fingerprint,
            _ms(lease.seconds),
            _ms(max(lease.seconds, lease.retention)),
            int(lease.hold),
            lease.holder,
        ]
        try:
            reply = await self._evaluate(CLAIM, key, args, deadline)
        except StoreTimeout:
            raise  # the budget is spent; the caller takes the token back in the background
        except StoreError as exc:
            # The claim may have been applied before the connection failed: read it back
            # within what is left of the same budget.
            try:
                reply = await self._evaluate(GET, key, (), deadline)
            except StoreError:
                raise StoreTimeout(f"claim outcome unknown: {exc}") from exc
            if reply == 0:
                raise
            record = parse_record(reply)
            return None if record.token == token else record
        return None if reply == 0 else parse_record(reply, flagged(reply))

    async def get(self, key: str) -> Record | None:
        reply = await self._evaluate(GET, key)
        return None if reply == 0 else parse_record(reply)

    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        args: list[Arg] = [
            token,
            COMPLETED_CODE,
            _ms(ttl),
            response.status,
            orjson.dumps(response.headers),
            response.body,
            int(response.replayable),
        ]
        return bool(await self._evaluate(COMPLETE, key, args))

    async def mark_indeterminate(self, key: str, token: str) -> bool:
        args: list[Arg] = [token, STATE_CODES[RecordState.INDETERMINATE], 0, 0, b"", b"", 0]
        return bool(await self._evaluate(COMPLETE, key, args))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._evaluate(RELEASE, key, [token]))

    async def discard(self, key: str) -> tuple[Record | None, bool]:
        reply = await self._evaluate(DISCARD, key)
        if reply == 0:
            return None, False
        return parse_record(reply), flagged(reply)

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._run(self.runner.ping())
        return time.perf_counter() - started

    async def eviction_policy(self) -> str | None:
        """The `maxmemory-policy`; on a Cluster, the first primary's that is not noeviction."""
        try:
            policies = await self._run(self.runner.config_values("maxmemory-policy"))
        except StoreError as exc:
            if isinstance(exc.__cause__, (ResponseError, RespError)):  # CONFIG disabled
                return None
            raise
        return next((p for p in policies if p != "noeviction"), policies[0] if policies else None)

    async def close(self) -> None:
        await self.runner.close()
