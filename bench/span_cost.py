"""`python -m bench.span_cost`: what span export costs, at sampling 1.0 and 0.01, against the
proxy without export (closed-loop wrk, modes interleaved round by round, medians).

The collector is an OTLP/HTTP sink in its own process (`--sink PORT`) that reads each export
and answers 200, on the side CPU with wrk and the upstream; the proxy is pinned to CPU 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Lab, Load, free_port, idemproxy_config, measure

SUT_CPU, SIDE_CPU = 0, 1
MODES: dict[str, float | None] = {"no export": None, "sampling 1.0": 1.0, "sampling 0.01": 0.01}


def sink(port: int) -> None:
    from aiohttp import web

    async def export(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if args.sink:
        sink(args.sink)
        return
    with tempfile.TemporaryDirectory() as scratch:
        lab = Lab(Path(scratch))
        try:
            upstream = lab.upstream(SIDE_CPU)
            port = free_port()
            argv = [sys.executable, "-m", "bench.span_cost", "--sink", str(port)]
            lab.start("otlp-sink", argv, port, SIDE_CPU)
            proxies = {}
            for name, ratio in MODES.items():
                config: dict[str, Any] = idemproxy_config(upstream)
                config["logging"] = {"access_log": True}
                if ratio is not None:
                    config["tracing"] = {"export": {
                        "endpoint": f"http://127.0.0.1:{port}/v1/traces",
                        "sampling_ratio": ratio,
                        "schedule_delay": "1s",
                    }}
                proxies[name] = lab.idemproxy(name.replace(" ", "-"), config, SUT_CPU)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in MODES}
            for _ in range(args.rounds):
                for name, service in proxies.items():
                    load = Load(service.url + "/", args.connections, args.seconds)
                    results[name].append(measure(service, load, SIDE_CPU))
        finally:
            lab.stop_all()
    print("| mode | req/s | p99 ms | CPU ms per 1k requests | errors |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        cpu = statistics.median(r["cpu_s_per_1k"] for r in runs) * 1000
        errors = sum(r["errors"] for r in runs)
        print(f"| {name} | {rps:,.0f} | {p99:.2f} | {cpu:.0f} | {errors} |")


if __name__ == "__main__":
    main()
