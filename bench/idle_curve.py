"""Pass-through cost against the number of idle keep-alive client connections held open.

    python -m bench --curves idle
    python -m bench.idle_curve [--counts 0,100,1000,5000] [--runs 3] [--seconds 4]

One idemproxy per count (pass-through, observability as shipped, pinned to CPU 0), each with
`count` client connections that sent one request and were left idle in keep-alive. Rounds are
interleaved across the proxies and each figure is the median over rounds: proxy CPU per request
under a closed-loop wrk load (32 connections), and p99 under a paced load of about 1,000 req/s
(50 connections, 50 ms apart). Upstream and wrk share CPU 1. `limits.header_timeout` (also the
keep-alive idle time) is raised so the held connections outlive the run, and
`limits.max_connections` so none of them is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import Lab, Load, Service, idemproxy_config, idle_connections, measure

SUT_CPU, SIDE_CPU = 0, 1
CLOSED_CONNECTIONS = 32
PACED_CONNECTIONS = 50  # each pausing 50 ms: about 1,000 req/s
# The held connections must stay open for the whole run: idle ones close after header_timeout.
HOLD_TIMEOUT = "1h"


def proxy_config(upstream: Service, held: int) -> dict[str, Any]:
    config = idemproxy_config(upstream)
    config["limits"] = {
        "header_timeout": HOLD_TIMEOUT,
        "max_connections": held + CLOSED_CONNECTIONS + PACED_CONNECTIONS + 16,
    }
    return config


def curve(counts: Sequence[int], runs: int, seconds: int) -> list[dict[str, Any]]:
    """One row per count: medians of CPU µs per request, closed-loop req/s, paced p99 and
    the proxy's RSS with the connections held."""
    samples: dict[int, list[dict[str, Any]]] = {count: [] for count in counts}
    rss: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="idemproxy-idle-") as tmp:
        lab = Lab(Path(tmp))
        try:
            upstream = lab.upstream(SIDE_CPU)
            proxies = {
                count: lab.idemproxy(f"proxy-{count}", proxy_config(upstream, count), SUT_CPU)
                for count in counts
            }
            with contextlib.ExitStack() as held:
                for count, proxy in proxies.items():
                    # Warm up before the idle connections arrive, as a proxy in service would.
                    measure(proxy, Load(proxy.url + "/", CLOSED_CONNECTIONS, 1), SIDE_CPU)
                    held.enter_context(idle_connections(proxy, count))
                    rss[count] = proxy.memory_kib("VmRSS")
                for _ in range(runs):
                    for count, proxy in proxies.items():
                        url = proxy.url + "/"
                        closed = measure(proxy, Load(url, CLOSED_CONNECTIONS, seconds), SIDE_CPU)
                        paced = Load(url, PACED_CONNECTIONS, seconds, delay_ms=PACED_CONNECTIONS)
                        latency = measure(proxy, paced, SIDE_CPU)
                        samples[count].append({"closed": closed, "paced": latency})
        finally:
            lab.stop_all()
    return [summarise(count, samples[count], rss[count]) for count in counts]


def summarise(count: int, runs: list[dict[str, Any]], rss_kib: int) -> dict[str, Any]:
    def median(load: str, key: str) -> float:
        return float(statistics.median(run[load][key] for run in runs))

    cpu = [run["closed"]["cpu_s_per_1k"] * 1000 for run in runs]
    return {
        "idle_connections": count,
        "cpu_us_per_request": median("closed", "cpu_s_per_1k") * 1000,
        # Single runs on a shared 2-core machine spread widely: a step must exceed this.
        "cpu_us_range": (min(cpu), max(cpu)),
        "rps": median("closed", "rps"),
        "paced_p99_ms": median("paced", "p99_ms"),
        "paced_cpu_us_per_request": median("paced", "cpu_s_per_1k") * 1000,
        "rss_mib": rss_kib / 1024,
        "errors": sum(run[load]["errors"] for run in runs for load in ("closed", "paced")),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["cpu_us_per_request"]
    lines = [
        "| idle connections | CPU per request | single runs | vs first row | req/s (closed loop) "
        "| p99 at ~1k req/s | CPU per request at ~1k req/s | RSS | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        low, high = row["cpu_us_range"]
        lines.append(
            f"| {row['idle_connections']:,} | {row['cpu_us_per_request']:.0f} µs "
            f"| {low:.0f} to {high:.0f} µs "
            f"| {row['cpu_us_per_request'] / base:.2f}x | {row['rps']:,.0f} "
            f"| {row['paced_p99_ms']:.2f} ms | {row['paced_cpu_us_per_request']:.0f} µs "
            f"| {row['rss_mib']:.1f} MiB | {row['errors']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,100,1000,5000")
    parser.add_argument("--runs", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--seconds", type=int, default=4, help="duration of each wrk run")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    print(markdown(curve(counts, args.runs, args.seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
