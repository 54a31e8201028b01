"""Redis record store: one hash per record under `idem:v1:{<key>}` (the hash tag keeps every
script on one Cluster slot), each transition one Lua script with compare-and-set on the owner
token; expiry (`PEXPIRE`) and lease deadlines (`TIME`) by the server, never by the proxy's clock.

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
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    Lease,
    Record,
    RecordState,
    StoredResponse,
    StoreError,
    StoreTimeout,
)

# The key namespace, not the record layout: version 2 records live under the same keys as
# version 1 ones, so a rolling upgrade finds every record the old version wrote.
KEY_PREFIX = "idem:v1:"

# The server's clock in ms, for the lease deadline stored in the record (never the proxy's:
# replicas' clocks differ; one server decides).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Appended to a script's HGETALL `record` (after _NOW): the flat list `_record` reads ends with
# the record's pttl and the server's clock.
_STAMP = """
record[#record + 1] = 'pttl'
record[#record + 1] = tostring(redis.call('PTTL', KEYS[1]))
record[#record + 1] = 'now'
record[#record + 1] = string.format('%d', now)
"""

# KEYS[1] record; ARGV token, fingerprint, lease ms, schema version, expiry ms, hold (1|0),
# holder. Returns 0 when the caller owns the record (new, taken over, or its own earlier claim),
# else the record. A record in flight whose lease ran out becomes indeterminate (hold) or is
# taken over (release_after_lease); version 1 records have no lease deadline and end by PEXPIRE.
_CLAIM = Script(_NOW + """
local token = redis.call('HGET', KEYS[1], 'token')
local expired = false
if token and token ~= ARGV[1] then
  local state = redis.call('HGET', KEYS[1], 'state')
  local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until'))
  if lease_until and lease_until <= now and state ~= 'completed' then
    if ARGV[6] == '0' then
      token = false
    elseif state == 'in_flight' then
      redis.call('HSET', KEYS[1], 'state', 'indeterminate')
      expired = true
    end
  end
end
if not token then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'v', ARGV[4], 'state', 'in_flight', 'token', ARGV[1], 'fp', ARGV[2],
             'lease_until', string.format('%d', now + tonumber(ARGV[3])), 'holder', ARGV[7],
             'created', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 0
end
if token == ARGV[1] then return 0 end
local record = redis.call('HGETALL', KEYS[1])
""" + _STAMP + """if expired then
  record[#record + 1] = 'expired_now'
  record[#record + 1] = '1'
end
return record
""")

_GET = Script(_NOW + """
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return 0 end
""" + _STAMP + """return record
""")

# ARGV token, new state, ttl ms, status, headers json, body, replayable (1|0).
# completed (from in_flight, or from indeterminate when a slow but live owner finishes after its
# lease ran out): store the response and restart the expiry at the retention ttl;
# indeterminate (from in_flight): keep the expiry. Repeating a finished transition answers 1.
_COMPLETE = Script("""
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == ARGV[2] then return 1 end
if ARGV[2] == 'indeterminate' then
  if state ~= 'in_flight' then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'indeterminate')
  return 1
end
if state == 'completed' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[4], 'headers', ARGV[5],
           'body', ARGV[6], 'replayable', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")

_RELEASE = Script("""
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'in_flight' then return 0 end
return redis.call('DEL', KEYS[1])
""")

# An operator's release: delete unless in flight under a live lease (version 1 in-flight
# records have no deadline and count as live; they end by PEXPIRE). Returns the record as it
# was, with `released` 1|0, or 0 when there is none.
_DISCARD = Script(_NOW + """
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return 0 end
""" + _STAMP + """local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until'))
local live = redis.call('HGET', KEYS[1], 'state') == 'in_flight'
  and (not lease_until or lease_until > now)
record[#record + 1] = 'released'
if live then
  record[#record + 1] = '0'
else
  redis.call('DEL', KEYS[1])
  record[#record + 1] = '1'
end
return record
""")


def redis_key(key: str) -> str:
    return f"{KEY_PREFIX}{{{key}}}"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _fields(reply: Sequence[bytes]) -> dict[bytes, bytes]:
    return {reply[i]: reply[i + 1] for i in range(0, len(reply) - 1, 2)}


def parse_record(reply: Sequence[bytes]) -> Record:
    """A record from the flat HGETALL(+pttl, now) list the scripts return."""
    fields = _fields(reply)
    version = fields.get(b"v", b"")
    if not version.isdigit() or int(version) not in READABLE_VERSIONS:
        raise StoreError(f"record schema {version!r} is not supported by this version")
    state = RecordState(fields[b"state"].decode())
    response = None
    if state == RecordState.COMPLETED:
        headers = tuple((k, v) for k, v in orjson.loads(fields[b"headers"]))
        response = StoredResponse(
            int(fields[b"status"]), headers, fields[b"body"], fields[b"replayable"] == b"1"
        )
    pttl = int(fields.get(b"pttl", b"-1"))
    now = int(fields.get(b"now", b"0"))
    lease_until = int(fields.get(b"lease_until", b"0"))
    created = int(fields.get(b"created", b"0"))
    return Record(
        state,
        fields[b"token"].decode(),
        fields[b"fp"].decode(),
        pttl / 1000 if pttl > 0 else 0.0,
        response,
        max(0, lease_until - now) / 1000 if lease_until else pttl / 1000 if pttl > 0 else 0.0,
        fields.get(b"holder", b"").decode(),
        # `created` is the server's clock; shown as is (server and proxy clocks agree closely).
        created / 1000,
        fields.get(b"expired_now") == b"1",
    )


class RedisStore:
    def __init__(self, runner: ScriptRunner, budget: float) -> None:
        self.runner = runner
        self.budget = budget

    @classmethod
    def from_url(cls, url: str, budget: float) -> RedisStore:
        return cls(runner_for(url, budget), budget)

    async def _run(self, coro: Any, deadline: float | None = None) -> Any:
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.budget
        try:
            async with asyncio.timeout_at(deadline):
                return await coro
        except (TimeoutError, RedisTimeoutError) as exc:
            raise StoreTimeout(f"redis did not answer within {self.budget:g}s") from exc
        except STORE_FAILURES as exc:
            raise StoreError(f"redis: {exc or type(exc).__name__}") from exc

    def _evaluate(self, script: Script, key: str, args: Sequence[Arg] = ()) -> Any:
        return self.runner.evaluate(script, redis_key(key), args)

    async def claim(self, key: str, token: str, fingerprint: str, lease: Lease) -> Record | None:
        deadline = asyncio.get_running_loop().time() + self.budget
        args: list[Arg] = [
            token,
            fingerprint,
            _ms(lease.seconds),
            SCHEMA_VERSION,
            _ms(max(lease.seconds, lease.retention)),
            int(lease.hold),
            lease.holder,
        ]
        try:
            reply = await self._run(self._evaluate(_CLAIM, key, args), deadline)
        except StoreTimeout:
            raise  # the budget is spent; the caller takes the token back in the background
        except StoreError as exc:
            # The claim may have been applied before the connection failed: read it back
            # within what is left of the same budget.
            try:
                reply = await self._run(self._evaluate(_GET, key), deadline)
            except StoreError:
                raise StoreTimeout(f"claim outcome unknown: {exc}") from exc
            if reply == 0:
                raise
            record = parse_record(reply)
            return None if record.token == token else record
        return None if reply == 0 else parse_record(reply)

    async def get(self, key: str) -> Record | None:
        reply = await self._run(self._evaluate(_GET, key))
        return None if reply == 0 else parse_record(reply)

    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        args: list[Arg] = [
            token,
            RecordState.COMPLETED,
            _ms(ttl),
            response.status,
            orjson.dumps(response.headers),
            response.body,
            int(response.replayable),
        ]
        return bool(await self._run(self._evaluate(_COMPLETE, key, args)))

    async def mark_indeterminate(self, key: str, token: str) -> bool:
        args: list[Arg] = [token, RecordState.INDETERMINATE, 0, 0, b"", b"", 0]
        return bool(await self._run(self._evaluate(_COMPLETE, key, args)))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._run(self._evaluate(_RELEASE, key, [token])))

    async def discard(self, key: str) -> tuple[Record | None, bool]:
        reply = await self._run(self._evaluate(_DISCARD, key))
        if reply == 0:
            return None, False
        return parse_record(reply), _fields(reply).get(b"released") == b"1"

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
