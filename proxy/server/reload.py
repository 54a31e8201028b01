"""Safe config reload: load, expand, validate and build the new Runtime first; only then swap.

A failed attempt keeps the running config and is logged, counted and shown in /health. The old
Runtime is closed once the requests that started on it have finished.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.admin.health import HealthMonitor
from proxy.admin.reloads import ReloadAttempt
from proxy.config import Config, ConfigError, config_hash, load
from proxy.config.urls import redact_url
from proxy.observability import events
from proxy.observability.events import emit
from proxy.pipeline.runtime import DataPlane, Runtime

# Settings bound when the listeners (and the file watcher) start; a reload cannot apply them
# half-way, so it refuses the whole file and asks for a restart.
RESTART_ONLY: tuple[tuple[str, ...], ...] = (
    ("listen",),
    ("admin",),
    ("limits", "max_header_bytes"),
    ("limits", "header_timeout"),
    ("reload",),
    # The supervisor started this many processes; each worker reloads only itself.
    ("workers",),
    # The one store is opened at start and outlives reloads.
    ("store", "url"),
    ("store", "timeout"),
    ("store", "max_records"),
    ("store", "max_bytes"),
)


def restart_required(running: Config, candidate: Config) -> list[str]:
    """One problem per setting that differs and only takes effect on restart."""
    old, new = running.model_dump(mode="json"), candidate.model_dump(mode="json")
    problems = []
    for path in RESTART_ONLY:
        before, after = _shown(_at(old, path)), _shown(_at(new, path))
        if before != after:
            problems.append(
                f"{'.'.join(path)}: changed from {before} to {after}; this needs a restart "
                "(the running config is kept)"
            )
    return problems


def _shown(value: Any) -> Any:
    """A setting as a reload answer may show it: URLs without their credentials."""
    return redact_url(value) if isinstance(value, str) else value


def _at(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


class Reloader:
    """Serialises reload attempts from every trigger (SIGHUP, POST /admin/reload, file watch)."""

    def __init__(self, path: str | Path, plane: DataPlane, monitor: HealthMonitor) -> None:
        self.path = Path(path)
        self.plane = plane
        self.monitor = monitor
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self, trigger: str) -> ReloadAttempt:
        async with self._lock:
            attempt = await self._attempt(trigger)
        self.monitor.reloads.record(attempt)
        self.plane.runtime.metrics.count_reload(attempt.result)
        return attempt

    async def _attempt(self, trigger: str) -> ReloadAttempt:
        running = self.plane.runtime
        old_hash = config_hash(running.config)
        try:
            config = await asyncio.to_thread(load, self.path)
            problems = restart_required(running.config, config)
            if problems:
                raise ConfigError(problems)
            new_hash = config_hash(config)
            if new_hash == old_hash:
                emit("config_reload", trigger=trigger, result="unchanged", hash=old_hash)
                return ReloadAttempt(time.time(), trigger, "unchanged", old_hash)
            runtime = Runtime(config, running.store, previous=running, metrics=running.metrics)
        except Exception as exc:  # any failure before the swap leaves the running config alone
            error = exc.problems if isinstance(exc, ConfigError) else [repr(exc)]
            emit(
                "config_reload",
                "error",
                trigger=trigger,
                result="failure",
                path=str(self.path),
                error=error,
                running_hash=old_hash,
            )
            return ReloadAttempt(time.time(), trigger, "failure", old_hash, error)
        self.plane.runtime = runtime
        events.configure(config.logging.level)
        await self.monitor.attach(config, runtime.store)
        self._retire(running)
        emit("config_reload", trigger=trigger, result="success", old_hash=old_hash, hash=new_hash)
        return ReloadAttempt(time.time(), trigger, "success", new_hash)

    def _retire(self, runtime: Runtime) -> None:
        async def close_when_idle() -> None:
            try:
                await runtime.inflight.wait_idle(None)
            finally:
                await runtime.close()

        task = asyncio.create_task(close_when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, timeout: float) -> None:
        """Let old runtimes finish their requests (bounded), then close them regardless."""
        if self._retiring:
            _, late = await asyncio.wait(self._retiring, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


def file_signature(path: Path) -> tuple[Any, ...] | None:
    """What changes when the file does, including a Kubernetes ConfigMap swap, where
    `proxy.yaml -> ..data/proxy.yaml` and `..data` is atomically re-pointed at a new directory."""
    try:
        stat = os.stat(path)  # follows the symlinks to the current target
    except OSError:
        return None
    return os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


async def watch(
    path: Path, poll_interval: float, debounce: float, changed: Callable[[], Awaitable[Any]]
) -> None:
    """Poll the file's signature; call `changed` once it differs and then holds still for
    `debounce` seconds (editors and `kubectl cp` write in several steps). No inotify needed."""
    applied = file_signature(path)
    while True:
        await asyncio.sleep(poll_interval)
        seen = file_signature(path)
        if seen == applied:
            continue
        while True:
            await asyncio.sleep(debounce)
            settled = file_signature(path)
            if settled == seen:
                break
            seen = settled
        applied = seen
        await changed()
