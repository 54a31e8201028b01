"""A scriptable upstream that records every request it receives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

Respond = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None


async def echo(request: web.Request) -> web.StreamResponse:
    """Default behaviour: answer 200 with a JSON echo of the request."""
    body = await request.read()
    return web.Response(
        body=orjson.dumps(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, _printable(v)] for k, v in request.headers.items()],
                "body": body.decode("latin-1"),
            }
        ),
        content_type="application/json",
    )


def _printable(value: str) -> str:
    """A header value as JSON can carry it: bytes that are not UTF-8 become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class RecordingUpstream:
    """Records requests; `respond` decides the answer (default: echo).

    `arrived` is set whenever a request arrives, so tests can wait for it instead of sleeping.
    """

    def __init__(self) -> None:
        self.url = ""  # set by the fixture once the server listens
        self.received: list[Received] = []
        self.respond: Respond = echo
        self.arrived = asyncio.Event()
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if self.respond is echo else b""
        self.received.append(
            Received(request.method, request.raw_path, list(request.headers.items()), body)
        )
        self.arrived.set()
        return await self.respond(request)

    @property
    def count(self) -> int:
        return len(self.received)
