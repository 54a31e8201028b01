"""A raw asyncio socket upstream in its own thread: records the exact bytes of every request the
proxy sends it and answers from a per-path script, including malformed or endless answers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tests.support.ports import wait_until

# A script is either the raw bytes of a whole response (the connection stays open), or a
# coroutine that writes what it likes; the connection is closed when it returns.
Script = bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawRequest:
    raw: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def stall_after(data: bytes) -> Script:
    """A script that sends `data` and then nothing more until the proxy hangs up."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await reader.read()

    return script


def endless(size: int, cut: threading.Event) -> Script:
    """A script that streams a `size`-byte body as fast as the proxy takes it; `cut` is set
    when the proxy hangs up first (it gave up on its client)."""
    block = bytes(64 * 1024)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        try:
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            cut.set()

    return script


class IncompleteRequest(Exception):
    """The connection ended before the request was complete."""


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """One HTTP/1.1 request as sent on the wire; None on a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise IncompleteRequest(exc.partial) from None
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    names = {k.lower(): v for k, v in headers}
    body = b""
    try:
        if names.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                body += size_line
                size = int(size_line.split(b";")[0], 16)
                body += await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif "content-length" in names:
            body = await reader.readexactly(int(names["content-length"]))
    except asyncio.IncompleteReadError as exc:
        raise IncompleteRequest(head + body + exc.partial) from None
    return RawRequest(head + body, method, target, headers, body)


class RawUpstream:
    def __init__(self) -> None:
        self.requests: list[RawRequest] = []
        # Requests whose connection ended before they were complete (aborted streaming bodies).
        self.incomplete: list[bytes] = []
        self.scripts: dict[str, Script] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RawUpstream:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(5)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, limit=1024 * 1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def count(self) -> int:
        return len(self.requests)

    def wait_for(self, count: int, timeout: float = 5) -> list[RawRequest]:
        wait_until(lambda: len(self.requests) >= count, timeout, f"{count} upstream requests")
        return self.requests

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await read_request(reader)
                except IncompleteRequest as exc:
                    self.incomplete.append(exc.args[0])
                    return
                if request is None:
                    return
                self.requests.append(request)
                script = self.scripts.get(request.target.split("?")[0], OK)
                if isinstance(script, bytes):
                    writer.write(script)
                    await writer.drain()
                    continue
                await script(reader, writer)
                return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()
