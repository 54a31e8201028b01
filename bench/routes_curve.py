"""Route lookup cost against the number of routes: the prefix tree and the scan it replaced.

    .venv/bin/python -m bench.routes_curve [--counts 1,10,100,1000,10000]

Each table has N routes `/r<i>/items` (every other one POST-only) and a catch-all `/` last, the
shape that made the scan slowest: a request for the last route, and one that only the catch-all
takes, walk past every route. Prints nanoseconds per lookup (best of 3 runs of about 0.2 s
each); a whole run takes well under a minute.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable, Sequence

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
    timer = timeit.Timer(call)
    number, _ = timer.autorange()  # enough calls for 0.2 s
    return min(timer.repeat(repeat=3, number=number)) / number * 1e9


def measure(count: int) -> dict[str, float]:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,100,1000,10000")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    print("| routes | tree, last route | tree, catch-all | normalise + tree | "
          "scan, last route | scan, catch-all |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count in counts:
        row = measure(count)
        cells = " | ".join(
            f"{row[key]:,.0f} ns"
            for key in ("tree_last", "tree_miss", "normalise_and_tree", "scan_last", "scan_miss")
        )
        print(f"| {count:,} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
