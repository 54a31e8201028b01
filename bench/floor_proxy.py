"""The floor for idemproxy's design: aiohttp's low-level server in front of the h1 upstream client
with nothing in between (no routing, tracing, header hygiene, logs or metrics).

Run: python -m bench.floor_proxy PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

from proxy.upstream.h1 import H1Transport

FRAMING = {"content-length", "transfer-encoding", "connection", "keep-alive"}


async def serve(port: int, upstream: str) -> None:
    transport = H1Transport(upstream, connect_timeout=2, timeout=30, max_connections=256)

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        answer = await transport.send(request.method, request.rel_url.raw_path_qs, [], None)
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        for name, value in answer.headers:
            if name.lower() not in FRAMING:
                response.headers.add(name, value)
        if answer.content_length is not None:
            response.content_length = answer.content_length
        await response.prepare(request)
        try:
            async for chunk in answer.chunks():
                await response.write(chunk)
            await response.write_eof()
        finally:
            answer.release()
        return response

    runner = web.ServerRunner(web.Server(forward, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2].rstrip("/")))
