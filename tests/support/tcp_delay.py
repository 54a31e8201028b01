"""A loopback TCP relay that can hold back the server's replies, to land a client's timeout or
cancellation between sending a command and reading its reply (the CVE-2023-28858 window)."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.ports import free_port


class DelayingRelay:
    """Relays 127.0.0.1:`port` to `target_port`; every reply chunk waits `reply_delay` seconds."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.reply_delay = 0.0
        self.connections = 0
        self.commands = 0  # chunks relayed to the server
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> DelayingRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        for task in (
            asyncio.create_task(self._pipe(client_r, server_w, delayed=False)),
            asyncio.create_task(self._pipe(server_r, client_w, delayed=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if not delayed:
                    self.commands += 1
                elif self.reply_delay:
                    await asyncio.sleep(self.reply_delay)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
