"""The health monitor: owns the background checks and the state the probes report.

`/health` fails exactly when `/ready` does; everything else that deserves attention is `warn`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import aiohttp

from proxy import __version__
from proxy.admin.checks import (
    Loop,
    Observation,
    Status,
    StoreCheck,
    StoreHealth,
    TargetHealth,
    TargetStates,
    UpstreamCheck,
    pending,
)
from proxy.admin.reloads import ReloadLog
from proxy.config import Config, config_hash

# /live fails when the main loop has not run its 1 s heartbeat for this long (a deadlock or a
# blocking call), which is what a liveness probe exists to catch.
HEARTBEAT = 1.0
LOOP_STALLED = 10.0


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
        self._heart: Loop | None = None
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
            self._heart = Loop(self._beat, HEARTBEAT, "health:heartbeat")
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
            ping = self.store.ping or pending(None)
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
