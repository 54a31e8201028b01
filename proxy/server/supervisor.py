"""`workers: N`: what `idemproxy run` becomes when N > 1.

The supervisor starts N worker processes (this interpreter running `proxy run` again, told its
index and private admin socket through the environment: proxy/server/worker_role.py). Each
worker binds the data port with SO_REUSEPORT, so the kernel spreads new connections over them;
the supervisor carries no data traffic. It binds the admin port itself and answers there from
what the workers report over their sockets (proxy/admin/fleet.py). SIGTERM and SIGINT drain
every worker, SIGHUP makes each reload the file. A worker that exits unexpectedly is restarted
with backoff; one that keeps exiting soon after its start (a port taken, a broken environment)
stops the whole supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy.admin.fleet import FleetAdmin
from proxy.config import Config
from proxy.observability import events, logsink
from proxy.observability.events import emit
from proxy.server.worker_role import WorkerRole

# Each worker's /live and /ready are read this often; the supervisor's probes answer from that.
POLL = 0.5
# A worker that ran this long had a good start: its exit begins a new count of quick exits.
STABLE_AFTER = 10.0
# This many exits in a row, each within STABLE_AFTER of the start: stop instead of spinning.
MAX_QUICK_EXITS = 5
BACKOFF = 0.5
MAX_BACKOFF = 8.0
# Beyond shutdown.timeout, how long draining workers get before they are killed.
KILL_MARGIN = 5.0
# Bound on one request to a worker's admin socket.
ASK_TIMEOUT = 2.0
EXIT_CRASH_LOOP = 1


def exit_status(returncode: int) -> int:
    """A process's exit as a shell reports it: the code, or 128 + the signal that killed it."""
    return returncode if returncode >= 0 else 128 - returncode


def describe_exit(returncode: int) -> dict[str, Any]:
    if returncode >= 0:
        return {"exit_code": returncode, "signal": None}
    return {"exit_code": None, "signal": signal.Signals(-returncode).name}


def exit_text(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode}"
    return f"signal {signal.Signals(-returncode).name}"


class Worker:
    """One worker slot: the current process, its last probe results and its restart history."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.quick_exits = 0
        self.restarts = 0
        self.live = False
        self.ready = False
        self._session: aiohttp.ClientSession | None = None

    @property
    def index(self) -> int:
        return self.role.index

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self, config_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.role.admin_socket)  # a socket left by the previous process
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            config_path,
            env={**os.environ, **self.role.environment()},
        )
        self.started = time.monotonic()

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def ask(
        self, method: str, path: str, accept: str = "", body: bytes | None = None
    ) -> tuple[int, bytes] | None:
        """One request to the worker's admin socket; None when it does not answer."""
        if not self.running:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(self.role.admin_socket),
                timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT),
            )
        headers = {"Accept": accept} if accept else {}
        try:
            async with self._session.request(
                method, "http://worker" + path, headers=headers, data=body
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def poll(self) -> None:
        live, ready = await asyncio.gather(self.ask("GET", "/live"), self.ask("GET", "/ready"))
        self.live = live is not None and live[0] == 200
        self.ready = ready is not None and ready[0] == 200

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Supervisor:
    def __init__(self, config: Config, path: str, admin_token: str | None = None) -> None:
        self.config = config
        self.admin_token = admin_token
        self.path = os.path.abspath(path)
        self.stop = asyncio.Event()
        self.trigger = ""
        self.exit_code = 0
        self.restarts = 0
        self.admin = FleetAdmin(self)
        self._dir = tempfile.mkdtemp(prefix="idemproxy-workers-")  # mode 0700: private
        self.workers = [
            Worker(WorkerRole(i, os.path.join(self._dir, f"worker-{i}.sock"), os.getpid()))
            for i in range(config.workers)
        ]

    async def run(self) -> int:
        """Supervise until told to stop, drain every worker, and return the worst exit code."""
        admin_app = self.admin.app(self.config.admin, self.admin_token)
        runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await runner.setup()
        loop = asyncio.get_running_loop()
        try:
            admin = self.config.admin
            await web.TCPSite(runner, admin.host, admin.port, reuse_address=True).start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            loop.add_signal_handler(signal.SIGHUP, self.forward, signal.SIGHUP)
            emit(
                "supervisor_started",
                workers=len(self.workers),
                listen=self.config.listen.port,
                admin=admin.port,
                pid=os.getpid(),
            )
            keepers = [asyncio.create_task(self._keep(worker)) for worker in self.workers]
            poller = asyncio.create_task(self._poll())
            await self.stop.wait()
            await self._drain(keepers)
            poller.cancel()
        finally:
            await runner.cleanup()
            for worker in self.workers:
                await worker.close()
            shutil.rmtree(self._dir, ignore_errors=True)
        emit("supervisor_stopped", exit_code=self.exit_code)
        logsink.STDOUT.flush(2.0)
        return self.exit_code

    def request_stop(self, trigger: str) -> None:
        if self.stop.is_set():
            return
        self.trigger = trigger
        emit("supervisor_draining", trigger=trigger, workers=len(self.workers))
        self.stop.set()

    def forward(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            worker.signal(sig)

    async def _keep(self, worker: Worker) -> None:
        """Run the worker's slot: start, wait for the exit, restart unless stopping."""
        while not self.stop.is_set():
            await worker.spawn(self.path)
            assert worker.process is not None
            if self.stop.is_set():  # the drain began while this worker was starting
                worker.signal(signal.SIGTERM)
            pid = worker.process.pid
            emit("worker_started", worker=worker.index, pid=pid, restarts=worker.restarts)
            returncode = await worker.process.wait()
            worker.live = worker.ready = False
            self.admin.metrics.retire(worker.index)
            uptime = time.monotonic() - worker.started
            exited = {"worker": worker.index, "pid": pid, **describe_exit(returncode)}
            if self.stop.is_set():
                emit("worker_exited", **exited, expected=True)
                # Killed by the forwarded SIGTERM itself: it was still starting, nothing to drain.
                if returncode != -signal.SIGTERM:
                    self.exit_code = max(self.exit_code, exit_status(returncode))
                return
            worker.quick_exits = worker.quick_exits + 1 if uptime < STABLE_AFTER else 1
            emit("worker_exited", "warning", **exited, expected=False, uptime_s=round(uptime, 3))
            if worker.quick_exits >= MAX_QUICK_EXITS:
                self._give_up(worker, returncode)
                return
            worker.restarts += 1
            self.restarts += 1
            delay = min(BACKOFF * 2 ** (worker.quick_exits - 1), MAX_BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    def _give_up(self, worker: Worker, returncode: int) -> None:
        detail = (
            f"worker {worker.index} exited {worker.quick_exits} times in a row within "
            f"{STABLE_AFTER:g}s of starting (the last with {exit_text(returncode)}); "
            "stopping instead of restarting it again (see its output above)"
        )
        emit("workers_crash_loop", "error", worker=worker.index, detail=detail)
        print(f"idemproxy: {detail}", file=sys.stderr, flush=True)
        self.exit_code = max(self.exit_code, EXIT_CRASH_LOOP)
        self.request_stop("crash_loop")

    async def _drain(self, keepers: list[asyncio.Task[None]]) -> None:
        """Forward the drain to every worker, wait for them (bounded), kill what is left."""
        self.forward(signal.SIGTERM)
        deadline = self.config.shutdown.timeout + KILL_MARGIN
        _, late = await asyncio.wait(keepers, timeout=deadline)
        if late:
            emit("workers_killed", "error", after_s=deadline, workers=len(late))
            self.forward(signal.SIGKILL)
            await asyncio.wait(late)

    async def _poll(self) -> None:
        while True:
            await asyncio.gather(*(worker.poll() for worker in self.workers))
            await asyncio.sleep(POLL)


async def supervise(config: Config, path: str, admin_token: str | None = None) -> int:
    events.configure(config.logging.level)
    return await Supervisor(config, path, admin_token).run()
