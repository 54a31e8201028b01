"""A tiny example service for trying idemproxy: POST /recognitions creates a record with a
fresh id, GET /recognitions lists them, so a duplicated POST is easy to see.

    python deploy/example/recognitions.py --port 8080
"""

from __future__ import annotations

import argparse
import itertools
import time

from aiohttp import web

RECORDS = web.AppKey("records", list)
IDS = web.AppKey("ids", itertools.count)


async def create(request: web.Request) -> web.Response:
    payload = await request.json() if request.can_read_body else {}
    record = {
        "id": f"rec_{next(request.app[IDS])}",
        "payload": payload,
        "idempotency_key": request.headers.get("Idempotency-Key"),
        "created_at": time.time(),
    }
    request.app[RECORDS].append(record)
    return web.json_response(
        record, status=201, headers={"Location": f"/recognitions/{record['id']}"}
    )


async def listing(request: web.Request) -> web.Response:
    records = request.app[RECORDS]
    return web.json_response({"count": len(records), "recognitions": records})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    app = web.Application()
    app[RECORDS] = []
    app[IDS] = itertools.count(1)
    app.router.add_post("/recognitions", create)
    app.router.add_get("/recognitions", listing)
    app.router.add_get("/healthz", healthz)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, print=None)
