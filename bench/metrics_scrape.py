"""Does a /metrics scrape stall the event loop? And what does the access log cost per request?

    python -m bench.metrics_scrape [--routes 50] [--seconds 3]

Builds a registry with N routes (every precreated series plus observations), serves the admin
app, and measures /live latency while a client scrapes /metrics back to back: once with the
real handler (rendered in a worker thread) and once rendering on the loop, for comparison.
Then times `AccessLog.record` (metrics + JSON line) per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from aiohttp import ClientSession, web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import generate_latest

from proxy.config import Logging, parse
from proxy.http.context import RequestContext
from proxy.observability.access_log import AccessLog
from proxy.observability.metrics import Metrics
from proxy.pipeline.runtime import live


def _metrics(routes: int) -> Metrics:
    config = parse(
        {
            "upstreams": {f"u{i}": {"url": f"http://127.0.0.1:{9000 + i}"} for i in range(10)},
            "routes": [
                {
                    "name": f"route{i}",
                    "match": {"path_prefix": f"/r{i}"},
                    "upstream": f"u{i % 10}",
                    "idempotency": {"enabled": i % 2 == 0},
                }
                for i in range(routes)
            ],
        },
        env={},
    )
    metrics = Metrics()
    metrics.compile(config)
    for i in range(routes):
        route = metrics.route(f"route{i}")
        for status in (200, 201, 404, 500):
            route.request("GET", status, 0.003 * (i % 7 + 1))
        route.idempotency("miss")
    return metrics


async def _on_loop(metrics: Metrics) -> web.Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry))

    return handle


async def _live_latency(base: str, seconds: float, scrape: bool) -> tuple[list[float], int]:
    latencies: list[float] = []
    scrapes = 0
    stop = time.monotonic() + seconds
    async with ClientSession() as session:

        async def scraper() -> None:
            nonlocal scrapes
            while time.monotonic() < stop:
                async with session.get(base + "/metrics") as response:
                    await response.read()
                scrapes += 1

        task = asyncio.create_task(scraper()) if scrape else None
        while time.monotonic() < stop:
            began = time.perf_counter()
            async with session.get(base + "/live") as response:
                await response.read()
            latencies.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(0.002)
        if task is not None:
            await task
    return latencies, scrapes


def _summary(name: str, latencies: list[float], scrapes: int) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return (
        f"| {name} | {statistics.median(ordered):.2f} | {p99:.2f} | {ordered[-1]:.2f} | "
        f"{scrapes} |"
    )


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/live", live)
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


class _Null:
    def write(self, line: bytes, urgent: bool = False) -> None:
        pass


def _record_cost(metrics: Metrics, n: int = 20000) -> float:
    log = AccessLog(Logging(), metrics, _Null())
    request = make_mocked_request(
        "GET", "/r1/items", headers={"User-Agent": "bench/1.0", "X-Request-Id": "abc"}
    )
    began = time.perf_counter()
    for _ in range(n):
        ctx = RequestContext(request, "127.0.0.1")
        ctx.trace_id, ctx.span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        ctx.upstream_name, ctx.upstream_duration = "u1", 0.001
        log.record(ctx, 200, 120, "GET", "/r1/items")
    return (time.perf_counter() - began) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    metrics = _metrics(args.routes)
    body = generate_latest(metrics.registry)
    renders = []
    for _ in range(20):
        began = time.perf_counter()
        generate_latest(metrics.registry)
        renders.append((time.perf_counter() - began) * 1000)
    series = sum(1 for line in body.splitlines() if not line.startswith(b"#"))
    print(f"{args.routes} routes: {series} series, {len(body)} bytes, "
          f"render median {statistics.median(renders):.2f} ms")
    print("| /live while | p50 ms | p99 ms | max ms | scrapes |")
    print("|---|---|---|---|---|")
    for name, handler, scrape in (
        ("idle", metrics.handle, False),
        ("scrapes, render in thread (shipped)", metrics.handle, True),
        ("scrapes, render on the loop", await _on_loop(metrics), True),
    ):
        runner, base = await _serve(handler)
        latencies, scrapes = await _live_latency(base, args.seconds, scrape)
        await runner.cleanup()
        print(_summary(name, latencies, scrapes))
    print(f"AccessLog.record (metrics + JSON line): {_record_cost(metrics):.1f} us per request")


if __name__ == "__main__":
    asyncio.run(main())
