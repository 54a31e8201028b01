"""The background health checks: store ping and eviction policy, upstream active checks.

Checks run on their own schedule and cache their last observation; the probe endpoints
(proxy/admin/probes.py) only read that cache, so a probe never fans out to Redis or the
upstream and answers in microseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from proxy.config import HealthCheck
from proxy.config.urls import redact_url
from proxy.observability.events import emit, iso_time

Status = Literal["pass", "warn", "fail"]
_MAX_PROBE_BODY = 64 * 1024


class StoreHealth(Protocol):
    """What the checks need from the idempotency store (see proxy/stores)."""

    async def ping(self) -> float:
        """Round trip in seconds; raises when the store cannot answer."""
        ...

    async def eviction_policy(self) -> str | None:
        """Redis `maxmemory-policy`, or None where eviction does not apply."""
        ...


@dataclass(frozen=True, slots=True)
class Observation:
    """One check result, in the shape of a draft-inadarei-api-health-check check object."""

    status: Status
    value: float | str | bool | None
    unit: str | None
    time: float
    output: str | None = None
    component_id: str | None = None

    def render(self, component_type: str) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "componentType": component_type}
        if self.component_id is not None:
            out["componentId"] = self.component_id
        out["observedValue"] = self.value
        if self.unit is not None:
            out["observedUnit"] = self.unit
        out["time"] = iso_time(self.time)
        if self.output:
            out["output"] = self.output
        return out


def _failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def probe_http(
    session: aiohttp.ClientSession, url: str, timeout: float, any_status: bool = False
) -> Observation:
    """GET `url`; 2xx and 3xx pass (as for a Kubernetes httpGet probe), or any answer at all
    with `any_status` (reachability only)."""
    started = time.perf_counter()
    shown = redact_url(url)
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, allow_redirects=False) as response:
                await response.content.read(_MAX_PROBE_BODY)
                status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        elapsed = _ms(started)
        return Observation("fail", elapsed, "ms", time.time(), _failure(exc), shown)
    elapsed = _ms(started)
    if any_status or 200 <= status < 400:
        return Observation("pass", elapsed, "ms", time.time(), None, shown)
    return Observation("fail", elapsed, "ms", time.time(), f"HTTP {status}", shown)


async def probe_store(store: StoreHealth, timeout: float) -> tuple[Observation, Observation | None]:
    """Ping the store, then read its eviction policy (None where it does not apply)."""
    try:
        async with asyncio.timeout(timeout):
            seconds = await store.ping()
    except Exception as exc:  # any failure of the store client means unreachable
        return Observation("fail", None, "ms", time.time(), _failure(exc)), None
    ping = Observation("pass", round(seconds * 1000, 3), "ms", time.time())
    try:
        async with asyncio.timeout(timeout):
            policy = await store.eviction_policy()
    except Exception as exc:  # CONFIG GET is often disabled on managed Redis
        reason = f"cannot read maxmemory-policy: {_failure(exc)}"
        return ping, Observation("warn", None, None, time.time(), reason)
    if policy is None:
        return ping, None
    if policy == "noeviction":
        return ping, Observation("pass", policy, None, time.time())
    reason = f"maxmemory-policy is {policy}: Redis may evict idempotency records before their TTL"
    return ping, Observation("warn", policy, None, time.time(), reason)


def pending(component_id: str | None) -> Observation:
    return Observation("warn", None, "ms", time.time(), "not checked yet", component_id)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


class Loop:
    """Runs `once` now and then every `interval` seconds until stopped."""

    def __init__(self, once: Callable[[], Awaitable[None]], interval: float, name: str) -> None:
        self._stopped = False
        self.task = asyncio.create_task(self._run(once, interval), name=name)

    async def _run(self, once: Callable[[], Awaitable[None]], interval: float) -> None:
        while not self._stopped:
            try:
                await once()
            except Exception as exc:  # a bug must not freeze the last result for good
                emit("health_check_error", "error", check=self.task.get_name(), error=repr(exc))
            await asyncio.sleep(interval)

    async def cancel(self) -> None:
        # The flag as well as cancel(): a client library may turn a cancellation that lands
        # in its own timeout into an ordinary error, and the loop must stop all the same.
        self._stopped = True
        self.task.cancel()
        await asyncio.wait({self.task})


TargetHealth = Callable[[str, int, bool], None]
# Upstream name -> per-target state from the running upstreams (`Upstream.snapshot()`: url,
# weight, healthy, circuit, retry_after); only upstreams with a circuit breaker or a check.
TargetStates = Callable[[], dict[str, list[dict[str, object]]]]


class UpstreamCheck:
    """Active HTTP checks of every target of one upstream; up while any target passes."""

    def __init__(
        self,
        name: str,
        urls: list[str],
        config: HealthCheck,
        session: aiohttp.ClientSession,
        on_target: TargetHealth | None = None,
    ) -> None:
        self.name = name
        self.urls = [redact_url(url) for url in urls]  # as Upstream.snapshot() shows them
        self._on_target = on_target
        self.identity = (tuple(urls), config)
        self.required = config.required
        self.targets = [url + config.path for url in urls]
        self.results: list[Observation | None] = [None] * len(urls)
        self._session = session
        self._timeout = config.timeout
        self._loop = Loop(self._once, config.interval, f"health:upstream:{name}")

    @property
    def up(self) -> bool | None:
        """None until the first round of checks has finished."""
        seen = [r for r in self.results if r is not None]
        return any(r.status == "pass" for r in seen) if seen else None

    async def _once(self) -> None:
        was = self.up
        self.results = list(
            await asyncio.gather(
                *(probe_http(self._session, url, self._timeout) for url in self.targets)
            )
        )
        if self._on_target is not None:
            for index, result in enumerate(self.results):
                self._on_target(self.name, index, result is not None and result.status == "pass")
        now = self.up
        if was is not None and now != was:
            emit(
                "upstream_health",
                "info" if now else "warning",
                upstream=self.name,
                up=now,
                output=[r.output for r in self.results if r is not None and r.output],
            )

    def observations(self) -> list[Observation]:
        return [
            r if r is not None else pending(redact_url(url))
            for r, url in zip(self.results, self.targets, strict=True)
        ]

    async def cancel(self) -> None:
        await self._loop.cancel()


class StoreCheck:
    def __init__(self, store: StoreHealth, interval: float, timeout: float) -> None:
        self.identity = (store, interval, timeout)
        self.store = store
        self.ping: Observation | None = None
        self.policy: Observation | None = None
        self._timeout = timeout
        self._loop = Loop(self._once, interval, "health:store")

    @property
    def up(self) -> bool | None:
        return None if self.ping is None else self.ping.status == "pass"

    async def _once(self) -> None:
        was = self.up
        self.ping, policy = await probe_store(self.store, self._timeout)
        if policy is not None or self.ping.status == "pass":
            self.policy = policy
        if was is not None and self.up != was:
            level = "info" if self.up else "error"
            emit("store_health", level, up=self.up, output=self.ping.output)

    async def cancel(self) -> None:
        await self._loop.cancel()
