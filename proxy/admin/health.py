"""Background health checks and the /live, /ready and /health endpoints.

Checks run on their own schedule and cache their last observation; the endpoints only read that
cache, so a probe never fans out to Redis or the upstream and answers in microseconds.
`/health` fails exactly when `/ready` does; everything else that deserves attention is `warn`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import aiohttp
import orjson
from aiohttp import web

from proxy import __version__
from proxy.config import Config, HealthCheck, config_hash
from proxy.config.urls import redact_url
from proxy.observability.events import emit, iso_time

Status = Literal["pass", "warn", "fail"]
HEALTH_JSON = "application/health+json"
_PROBE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
_MAX_PROBE_BODY = 64 * 1024
HISTORY = 10  # reload attempts kept for /health
# /live fails when the main loop has not run its 1 s heartbeat for this long (a deadlock or a
# blocking call), which is what a liveness probe exists to catch.
HEARTBEAT = 1.0
LOOP_STALLED = 10.0


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


def _pending(component_id: str | None) -> Observation:
    return Observation("warn", None, "ms", time.time(), "not checked yet", component_id)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def connect_report(config: Config, store: StoreHealth) -> tuple[bool, list[str]]:
    """`idemproxy check --connect`: one probe of the store and of every upstream target (its
    health path when configured, else any HTTP answer on `/`). False if anything failed."""
    lines: list[str] = []
    ping, policy = await probe_store(store, config.health.store_timeout)
    results = [ping]
    lines.append(_describe(f"store {config.store.url.split(':', 1)[0]}", ping))
    if policy is not None:
        lines.append(_describe("store eviction policy", policy))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for name, upstream in config.upstreams.items():
            check = upstream.health
            for url in upstream.target_urls:
                if check is not None:
                    seen = await probe_http(session, url + check.path, check.timeout)
                else:
                    seen = await probe_http(session, url + "/", upstream.connect_timeout, True)
                results.append(seen)
                lines.append(_describe(f"upstream {name} {seen.component_id}", seen))
    return all(r.status == "pass" for r in results), lines


def _describe(label: str, seen: Observation) -> str:
    shown = "" if seen.value is None else f" {seen.value}" + (f" {seen.unit}" if seen.unit else "")
    return f"{label}: {seen.status}{shown}" + (f" ({seen.output})" if seen.output else "")


# --- checks that run in the background ----------------------------------------------------


class _Loop:
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
        self._loop = _Loop(self._once, config.interval, f"health:upstream:{name}")

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
            r if r is not None else _pending(redact_url(url))
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
        self._loop = _Loop(self._once, interval, "health:store")

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


_CIRCUIT_STATUS: dict[object, Status] = {"closed": "pass", "half_open": "warn", "open": "warn"}


def upstream_check(
    check: UpstreamCheck | None, targets: list[dict[str, object]]
) -> list[dict[str, Any]]:
    """The `upstream:<name>` check: one object per target with its active-check result (when
    the upstream has `health:`), its weight and its circuit state. A target whose circuit is not
    closed is at least `warn`; when the circuit of every target with a weight is open (requests
    get 503 circuit-open), each object says so in `output`."""
    by_url = {str(t["url"]): t for t in targets}
    if check is not None:
        observed = zip(check.observations(), check.urls, strict=True)
        pairs = [(o, by_url.get(url)) for o, url in observed]
    else:
        now = time.time()
        pairs = [
            (Observation("pass", None, None, now, None, str(t["url"])), t) for t in targets
        ]
    serving = [t for t in targets if t["weight"]]  # weight 0: drained, never picked
    all_open = bool(serving) and all(t["circuit"] == "open" for t in serving)
    out: list[dict[str, Any]] = []
    for observation, target in pairs:
        rendered = observation.render("component")
        if target is not None:
            circuit = target["circuit"]
            if check is None:
                rendered["observedValue"] = circuit
            rendered["weight"] = target["weight"]
            if circuit is not None:
                rendered["circuitState"] = circuit
            if circuit == "open":
                rendered["circuitRetryAfter"] = round(cast(float, target["retry_after"]), 3)
            if rendered["status"] == "pass":
                rendered["status"] = _CIRCUIT_STATUS.get(circuit, "pass")
            if all_open:
                shown = [rendered.get("output"), "every target's circuit is open"]
                rendered["output"] = "; ".join(o for o in shown if o)
        out.append(rendered)
    return out


# --- reload history -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadAttempt:
    time: float
    trigger: str
    result: Literal["success", "failure", "unchanged"]
    hash: str  # the config running after the attempt
    error: list[str] | None = None

    def render(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": iso_time(self.time),
            "trigger": self.trigger,
            "result": self.result,
            "hash": self.hash,
        }
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class ReloadLog:
    """The last reload attempts, for /health; `totals` feeds idemproxy_config_reloads_total."""

    started: float = field(default_factory=time.time)
    # A tuple replaced on every record, so another thread can iterate it safely.
    history: tuple[ReloadAttempt, ...] = ()
    totals: dict[str, int] = field(
        default_factory=lambda: {"success": 0, "failure": 0, "unchanged": 0}
    )

    def record(self, attempt: ReloadAttempt) -> None:
        self.history = (*self.history, attempt)[-HISTORY:]
        self.totals[attempt.result] += 1

    @property
    def last(self) -> ReloadAttempt | None:
        return self.history[-1] if self.history else None


# --- the monitor --------------------------------------------------------------------------


class HealthMonitor:
    """Owns the background checks and the state the probes report.

    `attach(config, store)` on start and after every reload: checks whose settings did not
    change keep running (and keep their results), so a reload never makes /ready flap.
    """

    def __init__(self) -> None:
        self.draining = False
        self.reloads = ReloadLog()
        self.config: Config | None = None
        self.upstreams: dict[str, UpstreamCheck] = {}
        self.store: StoreCheck | None = None
        self._session: aiohttp.ClientSession | None = None
        # The main loop's heartbeat, for /live served from the admin thread.
        self.heartbeat = time.monotonic()
        self._heart: _Loop | None = None
        # Told each target's check result, so routing can eject and restore targets.
        self.on_target: TargetHealth | None = None
        # Read (from the admin thread) for each target's weight and circuit state.
        self.target_states: TargetStates = dict

    def loop_turning(self) -> bool:
        return time.monotonic() - self.heartbeat < LOOP_STALLED

    async def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    async def attach(self, config: Config, store: StoreHealth | None) -> None:
        # The admin thread reads this state while it changes: publish new containers by
        # assignment and never mutate one that may be read.
        if self._heart is None:
            self._heart = _Loop(self._beat, HEARTBEAT, "health:heartbeat")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
            )
        previous = self.upstreams
        checks: dict[str, UpstreamCheck] = {}
        for name, upstream in config.upstreams.items():
            if upstream.health is None:
                continue
            current = previous.get(name)
            if current is not None and current.identity == (
                tuple(upstream.target_urls),
                upstream.health,
            ):
                checks[name] = current
            else:
                checks[name] = UpstreamCheck(
                    name, upstream.target_urls, upstream.health, self._session, self.on_target
                )
        self.upstreams = checks
        settings = config.health
        stale_store = self.store
        identity = (store, settings.store_interval, settings.store_timeout)
        if stale_store is not None and stale_store.identity == identity:
            stale_store = None
        elif store is not None:
            self.store = StoreCheck(store, settings.store_interval, settings.store_timeout)
        else:
            self.store = None
        self.config = config
        for name, check in previous.items():
            if checks.get(name) is not check:
                await check.cancel()
        if stale_store is not None:
            await stale_store.cancel()

    async def close(self) -> None:
        if self._heart is not None:
            await self._heart.cancel()
        for check in self.upstreams.values():
            await check.cancel()
        if self.store is not None:
            await self.store.cancel()
        if self._session is not None:
            await self._session.close()

    def upstream_up(self) -> dict[str, bool]:
        """Metric hook for idemproxy_upstream_up{upstream}: checked upstreams only."""
        return {
            name: bool(check.up) for name, check in self.upstreams.items() if check.up is not None
        }

    def readiness(self) -> Iterator[tuple[str, bool]]:
        """(check name, ok) for everything /ready depends on."""
        yield "config", self.config is not None
        config = self.config
        if config is not None and config.store.on_error == "fail_closed" and self.store:
            yield "store", bool(self.store.up)
        for name, check in self.upstreams.items():
            if check.required:
                yield f"upstream:{name}", bool(check.up)
        yield "shutdown", not self.draining

    def report(self) -> dict[str, Any]:
        """The application/health+json document."""
        ready = all(ok for _, ok in self.readiness())
        checks: dict[str, list[dict[str, Any]]] = {}
        concerns: list[str] = []
        if self.store is not None:
            ping = self.store.ping or _pending(None)
            checks["store:responseTime"] = [ping.render("datastore")]
            if ping.status != "pass":
                concerns.append("store")
            if self.store.policy is not None:
                checks["store:evictionPolicy"] = [self.store.policy.render("datastore")]
                if self.store.policy.status != "pass":
                    concerns.append("store:evictionPolicy")
        states = self.target_states()
        for name in [*self.upstreams, *(n for n in states if n not in self.upstreams)]:
            rendered = upstream_check(self.upstreams.get(name), states.get(name, []))
            checks[f"upstream:{name}"] = rendered
            if not all(o["status"] == "pass" for o in rendered):
                concerns.append(f"upstream:{name}")
        checks["config:reload"] = [self._reload_check()]
        if checks["config:reload"][0]["status"] != "pass":
            concerns.append("config:reload")
        checks["proxy:draining"] = [
            Observation(
                "fail" if self.draining else "pass", self.draining, None, time.time()
            ).render("system")
        ]
        status: Status = "fail" if not ready else ("warn" if concerns else "pass")
        document: dict[str, Any] = {
            "status": status,
            "version": __version__,
            "releaseId": config_hash(self.config) if self.config is not None else None,
            "description": "idemproxy sidecar",
            "checks": checks,
        }
        if status != "pass":
            failed = [name for name, ok in self.readiness() if not ok]
            concerns = [name for name in concerns if name not in failed]
            document["output"] = "; ".join(
                ([f"not ready: {', '.join(failed)}"] if failed else [])
                + ([f"attention: {', '.join(concerns)}"] if concerns else [])
            )
        return document

    def _reload_check(self) -> dict[str, Any]:
        last = self.reloads.last
        running = config_hash(self.config) if self.config is not None else None
        failed = last is not None and last.result == "failure"
        observation = Observation(
            "warn" if failed else "pass",
            running,
            "configHash",
            last.time if last is not None else self.reloads.started,
            "\n".join(last.error or ()) if failed and last is not None else None,
        )
        out = observation.render("system")
        out["history"] = [attempt.render() for attempt in self.reloads.history]
        return out


# --- endpoints ----------------------------------------------------------------------------

Probe = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def ready_text(checks: list[tuple[str, bool]], verbose: bool) -> tuple[int, str]:
    """Kubernetes healthz format: `ok`, or one `[+]name ok` / `[-]name failed` line per check."""
    passed = all(ok for _, ok in checks)
    if passed and not verbose:
        return 200, "ok"
    lines = [f"[+]{name} ok" if ok else f"[-]{name} failed: reason withheld" for name, ok in checks]
    lines.append("ready check passed" if passed else "ready check failed")
    return (200 if passed else 503), "\n".join(lines) + "\n"


def probes(monitor: HealthMonitor) -> dict[str, Probe]:
    """Path -> handler for the three probe endpoints (admin port, optionally the data port)."""

    async def live(request: web.BaseRequest) -> web.Response:
        """200 while the main event loop turns; never looks at a dependency."""
        if not monitor.loop_turning():
            return web.Response(status=503, text="event loop stalled\n", headers=_PROBE_HEADERS)
        return web.Response(text="ok", headers=_PROBE_HEADERS)

    async def ready(request: web.BaseRequest) -> web.Response:
        verbose = "verbose" in request.query
        status, text = ready_text(list(monitor.readiness()), verbose)
        return web.Response(status=status, text=text, headers=_PROBE_HEADERS)

    async def health(request: web.BaseRequest) -> web.Response:
        document = monitor.report()
        return web.Response(
            status=503 if document["status"] == "fail" else 200,
            body=orjson.dumps(document),
            content_type=HEALTH_JSON,
            headers={"Cache-Control": "no-store"},
        )

    return {"/live": live, "/ready": ready, "/health": health}
