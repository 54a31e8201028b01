"""Route lookup cost against the number of routes: the prefix tree and the scan it replaced.

    .venv/bin/python -m bench.routes_curve [--counts 1,10,100,1000,10000] [--proxy]

Each table has N routes `/r<i>/items` (every other one POST-only) and a catch-all `/` last, the
shape that made the scan slowest: a request for the last route, and one that only the catch-all
takes, walk past every route. Prints CPU nanoseconds per lookup (best of 7 runs of about
0.2 s each); a whole run takes one to two minutes.

`--proxy` also runs `idemproxy run` with each table in front of the bench upstream and reports
its CPU per request under a short closed-loop wrk load (4 connections, 4 s, one core each for
proxy, upstream and wrk where the machine has them): routing's share of the whole request.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.harness import Lab, Load, idemproxy_config, measure
from proxy.http.path import normalise
from proxy.pipeline.routing import RouteTable, Spec


def linear_match(specs: Sequence[Spec[int]], path: str, method: str) -> int | None:
    """The first-match scan in config order that RouteTable replaced: segment-aware prefix,
    methods filter, case folded for ignore_case routes. The tests use it as the reference."""
    for spec in specs:
        if spec.methods is not None and method not in spec.methods:
            continue
        prefix, candidate = spec.prefix, path
        if spec.ignore_case:
            prefix, candidate = prefix.lower(), candidate.lower()
        if not candidate.startswith(prefix):
            continue
        if len(candidate) == len(prefix) or prefix.endswith("/") or candidate[len(prefix)] == "/":
            return spec.value
    return None


def specs(count: int) -> list[Spec[int]]:
    routes = [Spec(f"/r{i}/items", ["POST"] if i % 2 else None, i) for i in range(count)]
    return [*routes, Spec("/", None, count)]


def per_call_ns(call: Callable[[], object]) -> float:
    # CPU time of this process, not wall time: the figure other processes on a shared machine
    # disturb least.
    timer = timeit.Timer(call, timer=time.process_time)
    number, _ = timer.autorange()  # enough calls for 0.2 s
    return min(timer.repeat(repeat=7, number=number)) / number * 1e9


def lookup_costs(count: int) -> dict[str, float]:
    table_specs = specs(count)
    table = RouteTable(table_specs)
    last = f"/r{count - 1}/items/42"
    miss = "/other/x"
    method = "POST"
    assert table.match(last, method) == linear_match(table_specs, last, method) == count - 1
    assert table.match(miss, method) == linear_match(table_specs, miss, method) == count
    return {
        "tree_last": per_call_ns(lambda: table.match(last, method)),
        "tree_miss": per_call_ns(lambda: table.match(miss, method)),
        "normalise_and_tree": per_call_ns(lambda: table.match(normalise(last), method)),
        "scan_last": per_call_ns(lambda: linear_match(table_specs, last, method)),
        "scan_miss": per_call_ns(lambda: linear_match(table_specs, miss, method)),
    }


def proxy_cpu_per_request(counts: Sequence[int]) -> None:
    """CPU microseconds per request of a real proxy whose request goes to the catch-all route
    after `count` others (the order the scan was slowest in)."""
    print("\n| routes | proxy CPU per request | requests/s (1 core, closed loop) |")
    print("|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp))
        try:
            upstream = lab.upstream(cpu=1)
            for count in counts:
                config = idemproxy_config(upstream)
                config["logging"] = {"access_log": False}
                config["routes"][-1:-1] = [
                    {"name": f"r{i}", "match": {"path_prefix": f"/r{i}/items"}, "upstream": "app"}
                    for i in range(count)
                ]
                proxy = lab.idemproxy(f"proxy-{count}", config, cpu=0)
                measure(proxy, Load(proxy.url + "/", 4, 1), client_cpu=1)  # warm up
                row = measure(proxy, Load(proxy.url + "/", 4, 4), client_cpu=1)
                assert row["errors"] == 0, row
                print(f"| {count:,} | {row['cpu_s_per_1k'] * 1000:,.0f} µs | "
                      f"{row['rps']:,.0f} |", flush=True)
                proxy.stop()
        finally:
            lab.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,100,1000,10000")
    parser.add_argument("--proxy", action="store_true", help="also measure a real proxy")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    print("| routes | tree, last route | tree, catch-all | normalise + tree | "
          "scan, last route | scan, catch-all |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count in counts:
        row = lookup_costs(count)
        cells = " | ".join(
            f"{row[key]:,.0f} ns"
            for key in ("tree_last", "tree_miss", "normalise_and_tree", "scan_last", "scan_miss")
        )
        print(f"| {count:,} | {cells} |", flush=True)
    if args.proxy:
        proxy_cpu_per_request(counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
