"""Where a pass-through request's CPU goes, stage by stage (the README's per-stage budget).

    .venv/bin/python -m bench.stage_profile [--seconds 10] [--path /] [--out DIR]

Runs `idemproxy run` (pinned to CPU 0, as `make bench` does) under a closed-loop wrk load and
samples it with py-spy (a dev dependency). Each sample of the main thread is charged to the
deepest idemproxy frame on its stack, and that module to its stage; a sample with no idemproxy
frame is the event loop itself (uvloop, the socket syscalls). The stage's share of the samples
times the CPU per request measured over the same load gives microseconds per request.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Lab, Load, idemproxy_config, measure

SUT_CPU, SIDE_CPU = 0, 1
RATE = 1000  # samples per second

# Module path prefix -> stage, first match wins (most specific first).
STAGES: tuple[tuple[str, str], ...] = (
    ("proxy/server/", "server: llhttp parse, heads, socket writes"),
    ("proxy/http/request.py", "server: llhttp parse, heads, socket writes"),
    ("proxy/http/response.py", "server: llhttp parse, heads, socket writes"),
    ("proxy/observability/tracing.py", "tracing"),
    ("proxy/observability/", "access log and metrics"),
    ("proxy/pipeline/runtime.py", "dispatch: checks, path, route"),
    ("proxy/pipeline/routing.py", "dispatch: checks, path, route"),
    ("proxy/http/request_checks.py", "dispatch: checks, path, route"),
    ("proxy/http/path.py", "dispatch: checks, path, route"),
    ("proxy/pipeline/admission.py", "admission"),
    ("proxy/quota/", "quota"),
    ("proxy/idempotency/", "idempotency and its store"),
    ("proxy/stores/", "idempotency and its store"),
    ("proxy/redis/", "idempotency and its store"),
    ("proxy/pipeline/forward.py", "forward: headers, relay"),
    ("proxy/http/", "forward: headers, relay"),
    ("proxy/upstream/", "upstream client (h1 pool)"),
    ("proxy/cli.py", ""),  # the loop's caller: below it is the loop, not a stage
    ("proxy/__main__.py", ""),
    ("proxy/", "other"),
)
LOOP = "event loop: uvloop, syscalls"


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        _, _, location = frame.rpartition(" (")
        for prefix, stage in STAGES:
            if location.startswith(prefix):
                return stage or LOOP
    return LOOP


def attribute(raw: str) -> Counter[str]:
    """Samples of the main thread per stage, from py-spy's raw (collapsed) output. The other
    threads (the log writer, the admin port) are left out: py-spy cannot tell their waits from
    work, and their work is off the request's path."""
    shares: Counter[str] = Counter()
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        stack = stack_text.split(";")
        if stack[0].startswith("_run_module_as_main"):
            shares[stage_of(stack)] += int(count)
    return shares


def profile(seconds: int, path: str) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="idemproxy-profile-") as tmp:
        lab = Lab(Path(tmp))
        try:
            upstream = lab.upstream(SIDE_CPU)
            proxy = lab.idemproxy("idemproxy", idemproxy_config(upstream), SUT_CPU)
            url = proxy.url + path
            measure(proxy, Load(url, 32, 2), SIDE_CPU)  # warm up
            result: dict[str, Any] = {}
            loading = threading.Thread(
                target=lambda: result.update(measure(proxy, Load(url, 32, seconds), SIDE_CPU))
            )
            loading.start()
            raw_path = Path(tmp) / "profile.raw"
            subprocess.run(
                [spy, "record", "-p", str(proxy.pid), "-d", str(max(1, seconds - 2)),
                 "-r", str(RATE), "-f", "raw", "-o", str(raw_path), "--nonblocking"],
                check=True, capture_output=True,
            )  # fmt: skip
            loading.join()
            shares = attribute(raw_path.read_text())
        finally:
            lab.stop_all()
    total = sum(shares.values()) or 1
    per_request_us = result["cpu_s_per_1k"] * 1000
    return {
        "rps": result["rps"],
        "cpu_us_per_request": per_request_us,
        "samples": total,
        "stages": {
            stage: {"share": n / total, "us": per_request_us * n / total}
            for stage, n in shares.most_common()
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"CPU per pass-through request: {report['cpu_us_per_request']:.0f} µs "
        f"({report['rps']:,.0f} req/s closed loop, {report['samples']} samples of the main thread)",
        "",
        "| stage | share | µs per request |",
        "|---|---:|---:|",
    ]
    for stage, figures in report["stages"].items():
        lines.append(f"| {stage} | {figures['share']:.0%} | {figures['us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stage_profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="length of the sampled load")
    parser.add_argument("--path", default="/", help="request path (/ is the pass-through route)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    print(markdown(profile(args.seconds, args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
