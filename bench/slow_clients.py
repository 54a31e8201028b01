"""slowhttptest against idemproxy on loopback: slowloris (-H), slow body (-B), slow read (-X).

    python -m bench.slow_clients [--seconds 20] [--connections 200]

Starts a raw upstream and `idemproxy run` with short deadlines (header/body/write 5 s), runs
each slowhttptest mode while a probe thread sends one ordinary request every 200 ms, and prints
per mode: slowhttptest's view (most connections open at once, how many were closed), the
proxy's view (established connections on its port, sampled each second with `ss`), and the
probe's latency (median, max) and failures. Loopback only. Exits 0 with a note when the
`slowhttptest` binary is missing (apt-get install slowhttptest).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.raw_client import exchange
from tests.support.raw_upstream import RawUpstream

DEADLINE = "5s"
# A response big enough that a slow reader fills every buffer and meets the write deadline.
BIG = b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n" + bytes(4 * 1024 * 1024)
MODES = {
    "slowloris (-H)": ["-H", "-i", "2", "-x", "24"],
    "slow body (-B)": ["-B", "-i", "2", "-s", "8192", "-x", "10"],
    "slow read (-X)": ["-X", "-k", "4", "-n", "2", "-w", "1", "-y", "64", "-z", "8"],
}


def probe(port: int, stop: threading.Event, latencies: list[float], failures: list[str]) -> None:
    while not stop.wait(0.2):
        started = time.monotonic()
        try:
            response, connection = exchange(port, b"GET /probe HTTP/1.1\r\nHost: a\r\n\r\n", 5)
            connection.close()
        except OSError as exc:
            failures.append(repr(exc))
            continue
        if response is None or response.status != 200:
            failures.append(f"status {response.status if response else 'closed'}")
        else:
            latencies.append(time.monotonic() - started)


def proxy_side(port: int, stop: threading.Event, counts: list[int]) -> None:
    """Established connections the proxy holds, once a second (what slowhttptest cannot see:
    a reset connection still looks open to it until it has read its own receive buffer)."""
    while not stop.wait(1.0):
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
            capture_output=True, text=True, check=False,
        ).stdout
        counts.append(len(out.splitlines()))


def stats(csv_path: Path) -> tuple[int, int]:
    """(most connections held open at once, connections the server closed) from -g output."""
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    connected = max((int(row["Connected"]) for row in rows), default=0)
    closed = max((int(row["Closed"]) for row in rows), default=0)
    return connected, closed


def run_mode(name: str, flags: list[str], url: str, port: int, args: argparse.Namespace,
             workdir: Path) -> None:
    latencies: list[float] = []
    failures: list[str] = []
    held: list[int] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(port, stop, latencies, failures))
    sampler = threading.Thread(target=proxy_side, args=(port, stop, held))
    prober.start()
    sampler.start()
    prefix = workdir / name.split()[0].replace(" ", "_")
    try:
        subprocess.run(
            ["slowhttptest", *flags, "-c", str(args.connections), "-r", "100",
             "-l", str(args.seconds), "-p", "3", "-u", url, "-g", "-o", str(prefix)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.seconds + 60,
            check=False,
        )
    finally:
        stop.set()
        prober.join()
        sampler.join()
    connected, closed = stats(prefix.with_suffix(".csv"))
    median = statistics.median(latencies) * 1000 if latencies else float("nan")
    worst = max(latencies) * 1000 if latencies else float("nan")
    print(f"{name:15} slowhttptest: open max {connected:4}, closed {closed:4} | proxy holds: "
          f"max {max(held, default=0):4}, last {held[-1] if held else 0:4} | probe: "
          f"{len(latencies)} ok, median {median:.1f} ms, max {worst:.1f} ms, "
          f"{len(failures)} failed", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("slowhttptest") is None:
        print("skipped: slowhttptest is not installed (apt-get install slowhttptest)")
        return 0
    upstream = RawUpstream().start()
    upstream.scripts["/"] = BIG
    limits = {"header_timeout": DEADLINE, "body_timeout": DEADLINE, "write_timeout": DEADLINE}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        proxy = ProxyProcess(workdir / "proxy", base_config(upstream.url, limits=limits)).start()
        try:
            print(f"idemproxy on {proxy.url}, deadlines {DEADLINE}, {args.connections} "
                  f"connections, {args.seconds} s per mode")
            for name, flags in MODES.items():
                run_mode(name, flags, proxy.url + "/", proxy.port, args, workdir)
        finally:
            proxy.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
