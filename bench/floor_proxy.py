"""The floor for idemproxy's design: its own data-port server (proxy/server/protocol.py) in front
of its h1 upstream client with nothing in between (no routing, checks, tracing, header hygiene,
logs or metrics). What idemproxy costs beyond this is the pipeline's.

Run: python -m bench.floor_proxy PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from proxy.config import Limits
from proxy.http.request import Request
from proxy.http.response import StreamResponse
from proxy.server.listener import DataServer
from proxy.upstream.h1 import H1Transport

FRAMING = {"content-length", "transfer-encoding", "connection", "keep-alive"}


class Forwarder:
    def __init__(self, upstream: str) -> None:
        self.transport = H1Transport(upstream, connect_timeout=2, timeout=30, max_connections=256)

    async def __call__(self, request: Request) -> StreamResponse:
        query = request.query_string
        target = f"{request.raw_path}?{query}" if query else request.raw_path
        answer = await self.transport.send(request.method, target, [], None)
        response = StreamResponse(status=answer.status, reason=answer.reason)
        for name, value in answer.headers:
            if name.lower() not in FRAMING:
                response.headers.add(name, value)
        response.content_length = answer.content_length
        await response.prepare(request)
        try:
            async for chunk in answer.chunks():
                await response.write(chunk)
            await response.write_eof()
        finally:
            answer.release()
        return response

    def rejected(self, request: Request, response: StreamResponse) -> None:
        pass  # the floor keeps no log

    def connection_refused(self) -> None:
        pass  # nor metrics


async def serve(port: int, upstream: str) -> None:
    await DataServer(Forwarder(upstream), Limits()).listen("127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2].rstrip("/")))
