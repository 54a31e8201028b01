"""Replay cost against the number of records in the memory store.

    .venv/bin/python -m bench --curves records [--sizes 0,100000,1000000] [--seconds 5]
    .venv/bin/python -m bench.records_curve [the same options]

One `idemproxy run` (memory store, access log off, pinned to CPU 0) in front of the bench
upstream answering a 1 KiB JSON body. wrk (CPU 1, shared with the upstream) fills the store up
to each size in turn with keyed POSTs, a fresh Idempotency-Key each: first executions on the
product's own path, nothing test-only. At each size it measures a closed-loop replay of one key
(32 connections, after a 1 s warm-up): p50, p99 and the proxy's CPU per request. It also
reports what each record added to the proxy's RSS, less the bytes the store keeps for the
response (its headers and body, read from the store's own count on /metrics).

`--in-process` measures the store alone instead, filled directly in this process (claim and
complete, the stage's key, token and fingerprint shapes, the same 1 KiB response): CPU time of
a full garbage collection (best of 3) and RSS per record beyond the response's header names,
values and body. Both figures are free of the neighbours' noise that latency on a shared
machine is not.

Filling 1M records takes a few minutes on a 2-core machine (about 3,000 first executions a
second): the whole run is 5 to 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import Lab, Load, Service, idemproxy_config, measure, memory_kib
from proxy.stores import MemoryStore
from proxy.stores.base import Lease, StoredResponse
from proxy.stores.budget import CLAIM_BYTES

SUT_CPU, SIDE_CPU = 0, 1
BODY = '{"ok":true,"pad":"' + "x" * 1000 + '"}'  # 1,020 bytes
FILL_CHUNK_SECONDS = 60


def store_bytes(admin_url: str) -> float:
    """The memory store's own count of the bytes it holds (idemproxy_store_memory_bytes)."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("idemproxy_store_memory_bytes "):
                return float(line.split()[1])
    raise RuntimeError("no idemproxy_store_memory_bytes on /metrics")


class Filler:
    """Adds records to the proxy's store with wrk runs of fresh keys; counts them by the store's
    bytes, every record here having the same size."""

    def __init__(self, proxy: Service, admin_url: str, record_bytes: float) -> None:
        self.proxy, self.admin_url, self.record_bytes = proxy, admin_url, record_bytes
        self.rate = 2000.0  # first executions a second, corrected after each run

    def records(self) -> int:
        return round(store_bytes(self.admin_url) / self.record_bytes)

    def fill_to(self, target: int) -> int:
        count = self.records()
        while count < target:
            seconds = max(1, min(FILL_CHUNK_SECONDS, round((target - count) / self.rate)))
            load = Load(self.proxy.url + "/idem", 32, seconds, method="POST", key="fresh")
            row = measure(self.proxy, load, SIDE_CPU)
            assert row["errors"] == 0, row
            added, count = self.records() - count, self.records()
            self.rate = max(100.0, added / seconds)
        return count


def replay(proxy: Service, seconds: int) -> dict[str, Any]:
    load = Load(proxy.url + "/idem", 32, seconds, method="POST", key="fixed")
    measure(proxy, Load(load.url, 32, 1, method="POST", key="fixed"), SIDE_CPU)  # warm up
    row = measure(proxy, load, SIDE_CPU)
    assert row["errors"] == 0, row
    return row


def curve(sizes: Sequence[int], seconds: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="idemproxy-records-") as tmp:
        lab = Lab(Path(tmp))
        try:
            upstream = lab.upstream(SIDE_CPU, body=BODY)
            config = idemproxy_config(upstream)
            config["logging"] = {"access_log": False}  # 1M lines are not the cost measured
            config["store"] |= {"max_records": max(sizes) * 2 + 1000, "max_bytes": "8GiB"}
            proxy = lab.idemproxy("idemproxy", config, SUT_CPU)
            admin_url = f"http://127.0.0.1:{config['admin']['port']}"
            replay(proxy, 1)  # the replayed key's record, and a warm process
            filler = Filler(proxy, admin_url, store_bytes(admin_url))
            stored = filler.record_bytes - CLAIM_BYTES  # headers + body, as the store counts
            rss, records = proxy.memory_kib("VmRSS") * 1024, 1
            for size in sizes:
                count = filler.fill_to(size)
                now_rss = proxy.memory_kib("VmRSS") * 1024
                added = count - records
                row = replay(proxy, seconds)
                rows.append({
                    "records": count,
                    "p50_ms": row["p50_ms"],
                    "p99_ms": row["p99_ms"],
                    "rps": row["rps"],
                    "cpu_us": row["cpu_s_per_1k"] * 1000,
                    "rss_mib": now_rss / 2**20,
                    "stored_bytes": stored,
                    "overhead_bytes": (now_rss - rss) / added - stored if added > 1000 else None,
                })
                print(_row(rows[-1]), flush=True)
                rss, records = now_rss, count
        finally:
            lab.stop_all()
    return rows


HEADER = (
    "| records | replay p50 | replay p99 | replay req/s | CPU per request | RSS | "
    "bytes per added record beyond the stored headers + body |\n"
    "|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(row: dict[str, Any]) -> str:
    overhead = row["overhead_bytes"]
    stored = row["stored_bytes"]
    extra = "n/a" if overhead is None else f"{overhead:,.0f} B (stored {stored:,.0f} B)"
    return (
        f"| {row['records']:,} | {row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms | "
        f"{row['rps']:,.0f} | {row['cpu_us']:,.0f} µs | {row['rss_mib']:,.0f} MiB | {extra} |"
    )


def _hex(bits: int) -> str:
    return f"{random.getrandbits(bits):0{bits // 4}x}"


def _response() -> StoredResponse:
    """New objects for every record, as the recorder makes them from a parsed response."""
    headers = ((b"Content-Type".decode(), b"application/json".decode()),)
    return StoredResponse(200, headers, BODY.encode(), True)


def _full_collection_ms() -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        gc.collect()
        best = min(best, time.process_time() - started)
    return best * 1000


async def in_process(sizes: Sequence[int]) -> None:
    print("| records | full collection (CPU) | RSS per record | beyond the stored headers + body |")
    print("|---:|---:|---:|---:|")
    store = MemoryStore(max_records=max(sizes) + 1, max_bytes=1 << 40)
    lease = Lease(30, 86400, holder="bench:1")
    stored = len(BODY) + len("Content-Type") + len("application/json")
    gc.collect()
    rss, count = memory_kib(os.getpid(), "VmRSS") * 1024, 0
    for size in sizes:
        added = size - count
        for _ in range(added):
            key, token = _hex(160), _hex(128)
            await store.claim(key, token, _hex(160), lease)
            await store.complete(key, token, _response(), 86400)
        store.sweep()
        gc.collect()
        now_rss = memory_kib(os.getpid(), "VmRSS") * 1024
        per = f"{(now_rss - rss) / added:,.0f} B" if added else "n/a"
        beyond = f"{(now_rss - rss) / added - stored:,.0f} B" if added else "n/a"
        print(f"| {size:,} | {_full_collection_ms():.1f} ms | {per} | {beyond} |", flush=True)
        rss, count = now_rss, size
    await store.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="0,100000,1000000", help="records, comma-separated")
    parser.add_argument("--seconds", type=int, default=5, help="duration of each replay run")
    parser.add_argument("--in-process", action="store_true", help="the store alone, no proxy")


def run(args: argparse.Namespace) -> int:
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.in_process:
        asyncio.run(in_process(sizes))
        return 0
    print(HEADER, flush=True)
    curve(sizes, args.seconds)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
