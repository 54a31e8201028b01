"""Connects the running data plane to the health monitor and the metrics, in one place.

The monitor tells routing each target's check result and reads the targets' weight and circuit
state for /health; the metrics read the upstreams, circuits and memory store when scraped. Every
hook reads `plane.runtime` when called, so it follows the runtime a reload swaps in; the monitor
and the metrics outlive reloads, so this runs once at start.
"""

from __future__ import annotations

from proxy.admin import checks, probes
from proxy.admin.health import HealthMonitor
from proxy.pipeline.runtime import DataPlane
from proxy.stores import MemoryStore, Store
from proxy.upstream.breaker import STATE_VALUES


def target_states(plane: DataPlane) -> checks.TargetStates:
    """For /health (read from the admin thread): each checked or circuit-broken upstream of the
    running config with its targets' weight and circuit state."""

    def states() -> dict[str, list[dict[str, object]]]:
        return {
            name: upstream.snapshot()
            for name, upstream in list(plane.runtime.upstreams.items())
            if upstream.config.circuit_breaker is not None or upstream.config.health is not None
        }

    return states


def wire(plane: DataPlane, monitor: HealthMonitor, store: Store) -> None:
    """Before `monitor.attach`: the checks it starts take `on_target` as they are created."""

    def target_health(upstream: str, index: int, healthy: bool) -> None:
        current = plane.runtime.upstreams.get(upstream)  # a reload may have dropped it
        if current is not None and index < len(current.targets):
            current.set_target_healthy(index, healthy)

    def circuit_states() -> list[tuple[str, str, float]]:
        return [
            (name, label, STATE_VALUES[state])
            for name, upstream in list(plane.runtime.upstreams.items())
            for label, state in upstream.circuit_labels()
        ]

    def upstream_inflight() -> dict[str, int]:
        return {name: u.inflight for name, u in list(plane.runtime.upstreams.items())}

    monitor.on_target = target_health
    monitor.target_states = target_states(plane)
    plane.runtime.metrics.upstream_up = monitor.upstream_up
    plane.runtime.metrics.circuit_states = circuit_states
    if isinstance(store, MemoryStore):
        plane.runtime.metrics.store_memory = store.budget
    plane.runtime.metrics.upstream_inflight = upstream_inflight
    plane.probes = probes.probes(monitor)
