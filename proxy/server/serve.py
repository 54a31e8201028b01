"""Process lifecycle: the data and admin listeners, signals, shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

from proxy.admin import auth, keys, probes
from proxy.admin.health import HealthMonitor
from proxy.admin.thread import AdminThread
from proxy.config import Config, config_hash
from proxy.observability import events, logsink
from proxy.observability.events import emit
from proxy.pipeline.runtime import DataPlane, Runtime, admin_app
from proxy.server import reload
from proxy.server.lifecycle import Lifecycle
from proxy.server.listener import DataServer
from proxy.server.reload import Reloader
from proxy.server.wiring import wire
from proxy.server.worker_role import WorkerRole
from proxy.stores import MemoryStore, Store, StoreError, open_store

# At exit, how long buffered log lines may take to reach a slow stdout before they are dropped.
FLUSH_TIMEOUT = 2.0
# Bound on waiting for runtimes retired by a reload to finish their requests at exit.
CLEANUP_TIMEOUT = 0.5
# How often a worker checks that its supervisor still runs (it drains when orphaned).
ORPHAN_CHECK = 1.0


async def check_store(store: Store) -> None:
    """Warn when records may be forgotten (Redis may evict them; the memory store loses them
    with the process): a forgotten key's retry runs again."""
    if isinstance(store, MemoryStore):
        emit(
            "store_memory",
            "warning",
            detail="memory store: records live in this process only; keys claimed before a "
            "restart are forgotten and their retries run again (use redis:// to keep them)",
        )
        return
    try:
        policy = await store.eviction_policy()
    except StoreError as exc:
        emit("store_unreachable", "warning", detail=str(exc))
        return
    if policy is not None and policy != "noeviction":
        emit(
            "store_eviction_policy",
            "warning",
            maxmemory_policy=policy,
            detail="Redis may evict idempotency records under memory pressure; "
            "set maxmemory-policy noeviction",
        )


async def serve(
    config: Config, path: str, role: WorkerRole | None = None, admin_token: str | None = None
) -> None:
    """Run until SIGTERM, SIGINT or POST /admin/drain, then drain (see proxy.server.lifecycle).

    SIGHUP, POST /admin/reload and changes of the file at `path` reload the config; the one
    idempotency store outlives reloads. As one of a supervisor's workers (`role`), the data
    port is shared (SO_REUSEPORT), the admin app listens on the worker's private unix socket,
    and every log line carries `worker`. `admin_token` (auth.load_token) guards a TCP admin
    listener; a worker's socket is private to its supervisor, which checks the token itself.
    """
    logsink.STDOUT.limit = config.logging.buffer_size
    if role is not None:
        logsink.STDOUT.label("worker", role.index)
    events.configure(config.logging.level)
    store = open_store(config.store)
    await check_store(store)
    plane = DataPlane(Runtime(config, store))
    monitor = HealthMonitor()
    wire(plane, monitor, store)
    await monitor.attach(config, store)
    reloader = Reloader(path, plane, monitor)
    lifecycle = Lifecycle(plane, monitor, reloader)
    server = DataServer(plane, config.limits)
    admin = AdminThread(
        admin_app(
            probes.on_admin_port(plane.probes),
            {**lifecycle.actions(), **keys.for_plane(plane, asyncio.get_running_loop()).actions()},
            plane.runtime.metrics.handle,
            auth.guard(config.admin, admin_token) if role is None else (),
        ),
        config.admin.host,
        config.admin.port,
        role.admin_socket if role is not None else None,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lifecycle.request_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lifecycle.request_reload, "signal")
    tasks: list[asyncio.Task[None]] = []
    try:
        await server.listen(config.listen.host, config.listen.port, reuse_port=role is not None)
        await admin.start()
        if config.reload.watch:
            tasks.append(asyncio.create_task(_watch(config, Path(path), reloader)))
        if role is not None:
            tasks.append(asyncio.create_task(_drain_when_orphaned(role, lifecycle)))
        if not config.logging.hash_salt:
            emit(
                "hash_salt_random",
                "warning",
                detail="logging.hash_salt is empty: user.hash and idempotency.key_hash use a "
                "random per-process salt and cannot be correlated across replicas or restarts",
            )
        # What start-up built (modules, config, runtime: ~70,000 objects) lives as long as the
        # process. Frozen, the full collections that traffic triggers every few seconds skip
        # it: ~1 ms of CPU each instead of ~50 ms (docs/performance.md, "Garbage collection").
        # The one cost: after a config reload, whatever cyclic garbage the first runtime leaves
        # is never collected (once, bounded; later runtimes are not frozen).
        gc.collect()
        gc.freeze()
        emit(
            "started",
            hash=config_hash(config),
            listen=config.listen.port,
            admin=config.admin.port if role is None else role.admin_socket,
        )
        await lifecycle.stop.wait()
        await lifecycle.drain(server)
    finally:
        for task in tasks:
            task.cancel()
        await server.stop_listening()
        await server.shutdown()
        await reloader.close(CLEANUP_TIMEOUT)
        await plane.runtime.close()
        await monitor.close()
        await admin.stop()
        await store.close()
        emit("stopped")
        logsink.STDOUT.flush(FLUSH_TIMEOUT)


async def _drain_when_orphaned(role: WorkerRole, lifecycle: Lifecycle) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of serving on
    unsupervised."""
    while os.getppid() == role.supervisor_pid:
        await asyncio.sleep(ORPHAN_CHECK)
    lifecycle.request_stop("supervisor_gone")


async def _watch(config: Config, path: Path, reloader: Reloader) -> None:
    settings = config.reload

    async def changed() -> None:
        await reloader.reload("file")

    await reload.watch(path, settings.poll_interval, settings.debounce, changed)
