"""User-space instructions per pass-through request, counted by callgrind: a figure this VM's
noise cannot move (its CPU-time figures drift by up to 1.5x within an hour).

    .venv/bin/python -m bench.instructions [--modes idemproxy,floor] [--requests 600,1800]

Each mode runs in-process under `valgrind --tool=callgrind`: the real data-port server and
pipeline (`idemproxy`: the bench's pass-through config; `floor`: bench/floor_proxy.py's bare
forwarder) fed one request at a time through a stand-in client transport, in front of the bench
upstream over loopback. Two runs of different lengths cancel start-up out: per request is
(instructions(N2) - instructions(N1)) / (N2 - N1). System calls are counted up to the kernel's
door only, so this is the user-space part of the cost (`of it user` in `make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop

from bench.floor_proxy import Forwarder
from bench.harness import REPO, Lab, idemproxy_config
from proxy.config import Limits, parse
from proxy.observability import logsink
from proxy.pipeline.runtime import DataPlane, Runtime
from proxy.server.listener import DataServer, Plane
from proxy.stores import open_store

SIDE_CPU = 1
WARM_UP = 200  # requests before counting starts to matter: pools, caches, first-use paths
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
_COLLECTED = re.compile(rb"Collected : (\d+)")


class _Client:
    """The client side of one connection without a socket: what the server writes is kept,
    and a response is complete when the bench upstream's body ends it."""

    def __init__(self, end: bytes) -> None:
        self.end = end
        self.received = bytearray()
        self.answered: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.received += data
        if self.answered is not None and self.received.endswith(self.end):
            self.received.clear()
            self.answered.set_result(None)
            self.answered = None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 16384, 65536

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


async def drive(mode: str, upstream: str, requests: int) -> None:
    """`requests` pass-through requests, one at a time, through the server and `mode`'s plane."""
    plane: Plane
    if mode == "floor":
        plane, limits = Forwarder(upstream), Limits()
    else:
        config = parse(idemproxy_config(upstream))
        plane, limits = DataPlane(Runtime(config, open_store(config.store))), config.limits
    protocol = DataServer(plane, limits)()
    client = _Client(end=b"}")
    protocol.connection_made(client)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    for _ in range(WARM_UP + requests):
        client.answered = loop.create_future()
        protocol.data_received(REQUEST)
        await client.answered


def instructions(mode: str, upstream: str, requests: int) -> int:
    argv = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "bench.instructions", "--drive", mode, upstream, str(requests),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, check=True, timeout=900)
    found = _COLLECTED.search(done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count: {done.stderr[-500:]!r}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--modes", default="idemproxy,floor")
    parser.add_argument("--requests", default="600,1800", help="the two run lengths N1,N2")
    parser.add_argument("--drive", nargs=3, metavar=("MODE", "URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        mode, url, count = args.drive
        with open(os.devnull, "wb") as null:  # the access log is written, to nowhere
            logsink.STDOUT.fd = null.fileno()
            uvloop.run(drive(mode, url, int(count)))
            logsink.STDOUT.flush(1.0)
        return 0
    if not shutil.which("valgrind"):
        print("bench: valgrind is required (apt-get install valgrind)", file=sys.stderr)
        return 2
    short, long = (int(n) for n in args.requests.split(","))
    with tempfile.TemporaryDirectory(prefix="idemproxy-instructions-") as tmp:
        lab = Lab(Path(tmp))
        try:
            upstream = lab.upstream(SIDE_CPU)
            print("| mode | instructions per request |\n|---|---:|")
            for mode in args.modes.split(","):
                first, second = (instructions(mode, upstream.url, n) for n in (short, long))
                print(f"| {mode} | {(second - first) / (long - short):,.0f} |", flush=True)
        finally:
            lab.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
