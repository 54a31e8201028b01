"""The admin port on its own event loop in its own thread.

Probes then answer while the data plane's loop is saturated (Envoy's single admin thread behind
a busy scrape is a known cause of probe timeouts and restarts). Handlers there only read state
the main loop publishes by assignment; anything that changes state is handed to the main loop
(`run_on`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class AdminThread:
    def __init__(
        self, app: web.Application, host: str, port: int, socket_path: str | None = None
    ) -> None:
        """Serve `app` on host:port, or on the unix socket `socket_path` when given (a worker's
        private admin endpoint, read by its supervisor)."""
        self._app = app
        self._host = host
        self._port = port
        self._socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="admin", daemon=True)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._thread.start()
        await self._call(self._start())

    async def stop(self) -> None:
        if self._thread.is_alive():
            await self._call(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join)
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site: web.BaseSite
        if self._socket_path is not None:
            site = web.UnixSite(self._runner, self._socket_path)
        else:
            site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return await run_on(self._loop, coro)


async def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on `loop` (another thread's) and await its result from the current loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
