"""A byte-level upstream on the test's own event loop: records every request exactly as received
and answers each with the next scripted step, so the h1 client's framing and parsing can be
checked byte for byte. (`raw_upstream.RawUpstream` is the threaded one, scripted per path, for
tests against a real `idemproxy run` process; both read requests with the same function.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tests.support.raw_upstream import IncompleteRequest, read_request

CLOSE = object()  # script step: close the connection without answering
STALL = object()  # script step: never answer (the connection stays open)


@dataclass
class Step:
    """What to answer to one request: `data` is written, then the connection closes if `close`."""

    data: bytes | object
    close: bool = False


@dataclass
class ScriptedUpstream:
    script: list[Step] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, data: bytes | object, close: bool = False) -> None:
        self.script.append(Step(data, close))

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                try:
                    request = await read_request(reader)
                except IncompleteRequest:
                    break
                if request is None:
                    break
                self.requests.append(request.raw)
                self.arrived.set()
                step = (
                    self.script.pop(0)
                    if self.script
                    else Step(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                )
                if step.data is CLOSE:
                    break
                if step.data is STALL:
                    await asyncio.Event().wait()
                assert isinstance(step.data, bytes)
                writer.write(step.data)
                await writer.drain()
                if step.close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
