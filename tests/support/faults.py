"""Upstream behaviours a test switches on command: refuse, hang, answer 5xx, answer slowly."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from tests.support.ports import free_port
from tests.support.upstream import Respond


def refusing_url() -> str:
    """A loopback URL nothing listens on: connecting is refused (a not-sent failure)."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def unanswered_url() -> Iterator[str]:
    """A loopback URL whose connects hang until they time out: a listener that never accepts,
    with its accept queue full, so the kernel drops further SYNs (a not-sent failure that takes
    the whole `connect_timeout`)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        while len(fillers) < 16:
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(address)
            if not select.select([], [filler], [], 0.2)[1]:
                yield f"http://127.0.0.1:{address[1]}"  # this SYN went unanswered
                return
        raise RuntimeError("the listener kept accepting connections")
    finally:
        for sock in (*fillers, listener):
            sock.close()


def status(code: int) -> Respond:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, text=f"status {code}")

    return respond


def hang_until(release: asyncio.Event, code: int = 200) -> Respond:
    """Hold every request until `release` is set, then answer `code`."""

    async def respond(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=code, text="released")

    return respond


def first_then(first: Respond, rest: Respond, count: int = 1) -> Respond:
    """Answer the first `count` requests with `first`, later ones with `rest`."""
    seen = 0

    async def respond(request: web.Request) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        return await (first if seen <= count else rest)(request)

    return respond


async def poll_status(client: Any, wanted: int, method: str = "GET", path: str = "/poll",
                      within: float = 5.0, **kwargs: Any) -> Any:
    """Repeat a request until it answers `wanted` (for state that changes on time, such as a
    circuit's open_for); fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        response = await client.request(method, path, **kwargs)
        if response.status == wanted:
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} {path} did not answer {wanted} within {within}s")
        await asyncio.sleep(0.05)
