"""How the Redis store and the Redis quota limiter reach Redis: a Lua script runner per URL.

`redis://` (one standalone server) goes through `proxy.redis.resp`, about six times cheaper per
command than redis-py; `rediss://` (TLS), `redis+sentinel://` and `redis+cluster://` go through
redis-py (`proxy.redis.client`), which brings TLS, master discovery and slot routing. Both run
a script by its SHA and load it on NOSCRIPT (a restarted server, a new primary).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from proxy.config.store_url import StoreKind, parse_url
from proxy.redis import client as redis_client
from proxy.redis.resp import Arg, Lead, RespClient, RespConnectionError, RespError, pack

# What the Redis clients raise when the store, not the proxy, fails: RESP error replies and
# broken connections, redis-py's errors (RedisClusterException is not a RedisError: an
# unreachable cluster), and OSError, which includes TimeoutError. The idempotency store and the
# quota limiter both turn exactly these into their store errors; anything else is a bug.
STORE_FAILURES = (RespError, RespConnectionError, RedisError, RedisClusterException, OSError)


@dataclass(frozen=True)
class Script:
    source: str
    sha: str = field(init=False)
    evalsha: Lead = field(init=False)  # `EVALSHA <sha> 1`: the same for every call

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode()).hexdigest()
        object.__setattr__(self, "sha", sha)
        object.__setattr__(self, "evalsha", Lead("EVALSHA", sha, 1))


class ScriptRunner(Protocol):
    async def evaluate(
        self, script: Script, key: str, args: Sequence[Arg], deadline: float | None = None
    ) -> Any:
        """The script's reply; TimeoutError when none came by `deadline` (loop time)."""
        ...

    async def ping(self) -> None: ...

    async def config_values(self, name: str) -> list[str | None]:
        """The config parameter on the server (on a Cluster: on every primary)."""
        ...

    async def close(self) -> None: ...


def runner_for(url: str, timeout: float) -> ScriptRunner:
    """The runner for a store URL; creating it does no I/O."""
    target = parse_url(url)
    if target.kind is not StoreKind.REDIS:
        return RedisPyRunner(redis_client.connect(url, timeout))
    host, port = target.hosts[0]
    return RespRunner(
        RespClient(
            host,
            port,
            db=target.db,
            username=target.username,
            password=target.password,
            connect_timeout=timeout,
        )
    )


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None


class RespRunner:
    def __init__(self, client: RespClient) -> None:
        self.client = client

    async def evaluate(
        self, script: Script, key: str, args: Sequence[Arg], deadline: float | None = None
    ) -> Any:
        try:
            return await self.client.call(pack((key, *args), script.evalsha), deadline)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.client.call(pack(("EVAL", script.source, 1, key, *args)), deadline)

    async def ping(self) -> None:
        await self.client.execute("PING")

    async def config_values(self, name: str) -> list[str | None]:
        reply = await self.client.execute("CONFIG", "GET", name)
        return [_text(reply[1]) if len(reply) == 2 else None]

    async def close(self) -> None:
        await self.client.close()


class RedisPyRunner:
    def __init__(self, client: redis_client.Client) -> None:
        self.client = client
        self._scripts: dict[str, AsyncScript] = {}

    async def evaluate(
        self, script: Script, key: str, args: Sequence[Arg], deadline: float | None = None
    ) -> Any:
        if deadline is None:
            return await self._evaluate(script, key, args)
        async with asyncio.timeout_at(deadline):
            return await self._evaluate(script, key, args)

    async def _evaluate(self, script: Script, key: str, args: Sequence[Arg]) -> Any:
        runner = self._scripts.get(script.sha)
        if runner is None:
            runner = self._scripts[script.sha] = self.client.register_script(script.source)
        try:
            return await runner(keys=[key], args=args)
        except NoScriptError:
            # redis-py loads a missing script only after the first EVALSHA; when that EVALSHA's
            # reconnect-retry reached another server (the new primary after a failover), its
            # NOSCRIPT comes back unhandled.
            return await runner(keys=[key], args=args)

    async def ping(self) -> None:
        await self.client.ping()

    async def config_values(self, name: str) -> list[str | None]:
        replies: list[object]
        if isinstance(self.client, RedisCluster):
            per_node = await self.client.config_get(name, target_nodes=RedisCluster.PRIMARIES)
            replies = list(per_node.values())
        else:
            replies = [await self.client.config_get(name)]
        return [_text(reply.get(name)) for reply in replies if isinstance(reply, dict)]

    async def close(self) -> None:
        await redis_client.close(self.client)
