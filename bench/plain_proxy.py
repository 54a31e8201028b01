"""The Python reference: the obvious aiohttp reverse proxy (web.Application + ClientSession).

Run: python -m bench.plain_proxy PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import ClientSession, TCPConnector, web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


def make_app(upstream: str) -> web.Application:
    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(connector=TCPConnector(limit=256), auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        session: ClientSession = request.app["session"]
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as upstream_response:
            payload = await upstream_response.read()
            relayed = {k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP}
            return web.Response(status=upstream_response.status, headers=relayed, body=payload)

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    uvloop.install()
    web.run_app(make_app(upstream), host="127.0.0.1", port=port, access_log=None, print=None)
