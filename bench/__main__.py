"""`python -m bench`: direct vs nginx vs a plain aiohttp proxy vs idemproxy, side by side.

Every mode gets a closed-loop throughput run (wrk -t1 -cN) and a paced latency run at about
1,000 req/s; modes are interleaved round by round and each figure is the median over rounds.
The server under test is pinned to CPU 0; upstream, Redis and wrk share CPU 1.

`python -m bench --curves NAME[,NAME] [--quick] [the curve's own options]` runs cost curves
instead: `idle` (idle keep-alive connections, bench/idle_curve.py), `records` (records in the
memory store, bench/records_curve.py), `routes` (number of routes, bench/routes_curve.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import idle_curve, records_curve, routes_curve
from bench.harness import (
    Lab,
    Load,
    Service,
    idemproxy_config,
    measure,
    rss_with_connections,
)
from bench.report import markdown
from bench.targets import BASELINE, PASS_THROUGH, evaluate
from bench.targets import markdown as targets_markdown

SUT_CPU, SIDE_CPU = 0, 1
# `workers: 2` may use every core: on a 2-core machine it shares CPU 1 with upstream and wrk.
WORKERS_CPUS = (SUT_CPU, SIDE_CPU)
RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Mode:
    name: str
    service: str
    path: str = "/"
    method: str = "GET"
    key: str = "none"

    @property
    def replay(self) -> bool:
        return self.key == "fixed"


# Cost curves: each one's `main(argv)`, with the argv of a full run and of a `--quick` smoke run.
CURVES: dict[str, tuple[Callable[[list[str]], int], list[str], list[str]]] = {
    "idle": (idle_curve.main, [], ["--counts", "0,100", "--runs", "1", "--seconds", "1"]),
    "records": (records_curve.main, [], ["--in-process", "--sizes", "0,2000"]),
    "routes": (routes_curve.main, ["--proxy"], ["--counts", "1,100"]),
}


def curves(names: str, quick: bool, options: list[str]) -> int:
    """Run each named curve with `options` when given (a curve's own), else its preset."""
    for name in names.split(","):
        run_curve, full, smoke = CURVES[name]
        print(f"\n## {name}\n", flush=True)
        if status := run_curve(options or (smoke if quick else full)):
            return status
    return 0


def baseline_modes() -> list[Mode]:
    """`--baseline`: the other build's pass-through and Redis modes (the targets' rows)."""
    modes = [Mode(BASELINE.pass_through, "baseline")]
    if shutil.which("redis-server"):
        modes.append(Mode(BASELINE.first, "baseline-redis", "/idem", "POST", "fresh"))
        modes.append(Mode(BASELINE.replay, "baseline-redis", "/idem", "POST", "fixed"))
    return modes


def all_modes() -> list[Mode]:
    modes = [Mode("direct", "upstream")]
    if shutil.which("nginx"):
        modes.append(Mode("nginx", "nginx"))
    modes.append(Mode("plain", "plain"))
    modes.append(Mode("floor", "floor"))
    # Pass-through on the one upstream transport (the h1 client; the aiohttp one was removed).
    modes.append(Mode(PASS_THROUGH, PASS_THROUGH))
    modes.append(Mode("idemproxy-w2", "idemproxy-w2"))
    stores = ["memory"] + (["redis"] if shutil.which("redis-server") else [])
    for store in stores:
        modes.append(Mode(f"idem-first-{store}", f"idem-{store}", "/idem", "POST", "fresh"))
        modes.append(Mode(f"idem-replay-{store}", f"idem-{store}", "/idem", "POST", "fixed"))
    return modes


def start_services(
    lab: Lab, modes: list[Mode], baseline: Path | None = None
) -> dict[str, Service]:
    needed = {m.service for m in modes}
    upstream = lab.upstream(SIDE_CPU)
    services = {"upstream": upstream}
    for name in sorted(needed - {"upstream"}):
        if name == "nginx":
            services[name] = lab.nginx_proxy(upstream, SUT_CPU)
        elif name == "plain":
            services[name] = lab.python_proxy(name, "plain_proxy", upstream, SUT_CPU)
        elif name == "floor":
            services[name] = lab.python_proxy(name, "floor_proxy", upstream, SUT_CPU)
        elif name == "idemproxy-w2":
            config = idemproxy_config(upstream, workers=2)
            services[name] = lab.idemproxy(name, config, WORKERS_CPUS)
        elif name == PASS_THROUGH:
            services[name] = lab.idemproxy(name, idemproxy_config(upstream), SUT_CPU)
        elif name == "idem-redis":
            redis = lab.redis(SIDE_CPU)
            config = idemproxy_config(upstream, store_url=redis.url.replace("http://", "redis://"))
            services[name] = lab.idemproxy(name, config, SUT_CPU)
        elif name == "idem-memory":
            services[name] = lab.idemproxy(name, idemproxy_config(upstream), SUT_CPU)
        elif name == "baseline" and baseline is not None:
            config = idemproxy_config(upstream, sized=False)
            services[name] = lab.idemproxy(name, config, SUT_CPU, checkout=baseline)
        elif name == "baseline-redis" and baseline is not None:
            redis = lab.redis(SIDE_CPU)
            config = idemproxy_config(upstream, store_url=redis.url.replace("http://", "redis://"))
            services[name] = lab.idemproxy(name, config, SUT_CPU, checkout=baseline)
    return services


def replays(url: str) -> bool:
    """Complete the fixed-key record, and tell whether a retry is answered from the store."""
    headers: dict[str, str] = {}
    for _ in range(2):
        request = urllib.request.Request(
            url,
            data=b'{"amount":1000,"currency":"EUR","note":"benchmark"}',
            headers={"Content-Type": "application/json", "Idempotency-Key": "bench-fixed-key"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            headers = dict(response.headers)
    return headers.get("Idempotent-Replayed") == "true"


def machine(python: str) -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = all_modes()
    if args.modes:
        wanted = args.modes.split(",")
        modes = [m for m in modes if m.name in wanted or m.name.startswith(tuple(wanted))]
    if not any(m.name == "direct" for m in modes):
        modes.insert(0, Mode("direct", "upstream"))
    if args.baseline is not None:
        modes += baseline_modes()
    samples: dict[str, list[dict[str, Any]]] = {m.name: [] for m in modes}
    skipped: list[str] = []
    started = datetime.now(UTC)
    host = machine(args.python)  # before the load: its load average is the neighbours' alone
    with tempfile.TemporaryDirectory(prefix="idemproxy-bench-") as tmp:
        lab = Lab(Path(tmp), pin=not args.no_pin, python=args.python)
        try:
            services = start_services(lab, modes, args.baseline)
            for mode in [m for m in modes if m.replay]:
                if not replays(services[mode.service].url + mode.path):
                    skipped.append(f"{mode.service}: no idempotency engine answered a replay")
                    modes = [m for m in modes if m.service != mode.service]
            for round_no in range(args.runs):
                for mode in modes:
                    service = services[mode.service]
                    url = service.url + mode.path
                    shape = {"method": mode.method, "key": mode.key}
                    closed = Load(url, args.connections, args.seconds, **shape)
                    # N connections pausing N ms each on average: about one request per ms.
                    paced = Load(
                        url, args.paced, args.seconds, delay_ms=args.paced, pacing=args.pacing,
                        **shape,
                    )
                    if round_no == 0 and args.warmup:
                        warmup = Load(url, args.connections, args.warmup, **shape)
                        measure(service, warmup, SIDE_CPU)
                    throughput = measure(service, closed, SIDE_CPU)
                    latency = measure(service, paced, SIDE_CPU)
                    samples[mode.name].append({"throughput": throughput, "latency": latency})
                    print(
                        f"round {round_no + 1}/{args.runs} {mode.name:20s} "
                        f"{throughput['rps']:9.0f} req/s  p50 {latency['p50_ms']:.2f} ms "
                        f"at {latency['rps']:.0f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
            held = {
                name: rss_with_connections(s, args.hold)
                for name, s in services.items()
                if args.hold and name in {m.service for m in modes} - {"upstream"}
            }
            peaks = {name: s.memory_kib("VmHWM") for name, s in services.items()}
            idle = {name: s.idle_rss_kib for name, s in services.items()}
            soaked = soak(services, modes, args.soak) if args.soak else None
        finally:
            lab.stop_all()
    results = summarise(modes, samples, peaks, idle, held)
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "machine": host,
        "parameters": {
            "runs": args.runs,
            "seconds": args.seconds,
            "connections": args.connections,
            "paced_connections": args.paced,
            "paced_target_rps": 1000,
            "pacing": args.pacing,
            "pinned": not args.no_pin,
            "proxy_python": args.python,
            "held_connections": args.hold,
            "baseline": None if args.baseline is None else str(args.baseline),
        },
        "modes": results,
        "skipped": skipped,
        "soak": soaked,
    }


def soak(services: dict[str, Service], modes: list[Mode], seconds: int) -> dict[str, Any]:
    """RSS growth of the first idemproxy under a long paced run at about 500 req/s."""
    name = next(m.service for m in modes if m.service.startswith("idemproxy"))
    service = services[name]
    load = Load(service.url + "/", 25, seconds, delay_ms=50)
    measure(service, Load(service.url + "/", 25, 10, delay_ms=50), SIDE_CPU)  # settle
    before = service.memory_kib("VmRSS")
    result = measure(service, load, SIDE_CPU)
    after = service.memory_kib("VmRSS")
    return {
        "service": name,
        "seconds": seconds,
        "rps": result["rps"],
        "rss_before_mib": before / 1024,
        "rss_after_mib": after / 1024,
        "growth_pct": (after - before) / before * 100,
        "errors": result["errors"],
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise(
    modes: list[Mode],
    samples: dict[str, list[dict[str, Any]]],
    peaks: dict[str, int],
    idle: dict[str, int],
    held: dict[str, int],
) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        runs = samples[mode.name]
        row: dict[str, Any] = {
            "mode": mode.name,
            "rps": _median([r["throughput"]["rps"] for r in runs]),
            "cpu_s_per_1k": _median([r["throughput"]["cpu_s_per_1k"] for r in runs]),
            "user_s_per_1k": _median([r["throughput"]["user_s_per_1k"] for r in runs]),
            "kernel_s_per_1k": _median([r["throughput"]["kernel_s_per_1k"] for r in runs]),
            "paced_rps": _median([r["latency"]["rps"] for r in runs]),
            "cores_at_paced": _median([r["latency"]["cores"] for r in runs]),
            "idle_rss_mib": idle[mode.service] / 1024,
            "peak_rss_mib": peaks[mode.service] / 1024,
            "held_rss_mib": held[mode.service] / 1024 if mode.service in held else None,
            "errors": sum(r["throughput"]["errors"] + r["latency"]["errors"] for r in runs),
            "runs": runs,
        }
        for p in ("p50", "p90", "p99"):
            row[f"{p}_ms"] = _median([r["latency"][f"{p}_ms"] for r in runs])
        rows.append(row)
    by_name = {row["mode"]: row for row in rows}
    direct = by_name["direct"]
    for row in rows:
        for p in ("p50", "p90", "p99"):
            row[f"{p}_added_ms"] = row[f"{p}_ms"] - direct[f"{p}_ms"]
        # Requests per CPU-second: throughput had the process a whole core to itself, which
        # holds steady when other load on the machine steals time from the closed-loop runs.
        row["rps_per_core"] = 1000 / row["cpu_s_per_1k"] if row["cpu_s_per_1k"] else None
        for ref in ("direct", "nginx", "plain"):
            if ref in by_name and by_name[ref]["rps"]:
                row[f"x_{ref}"] = row["rps"] / by_name[ref]["rps"]
        if "plain" in by_name and row["rps_per_core"] and by_name["plain"]["cpu_s_per_1k"]:
            row["x_plain_per_core"] = row["rps_per_core"] * by_name["plain"]["cpu_s_per_1k"] / 1000
    return rows


def main(argv: list[str] | None = None) -> int:
    # A curve has options of its own (some named like the comparison's): it takes the rest.
    chooser = argparse.ArgumentParser(prog="python -m bench", add_help=False)
    chooser.add_argument("--curves", default="")
    chooser.add_argument("--quick", action="store_true")
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.curves:
        unknown = set(chosen.curves.split(",")) - CURVES.keys()
        if unknown:
            chooser.error(f"unknown curve: {', '.join(sorted(unknown))}")
        return curves(chosen.curves, chosen.quick, rest)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--seconds", type=int, default=4, help="duration of each wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds in round 1")
    parser.add_argument("--connections", type=int, default=32, help="closed-loop connections")
    parser.add_argument(
        "--paced-connections",
        dest="paced",
        type=int,
        default=50,
        help="latency run: N connections each pausing N ms between requests (~1,000 req/s)",
    )
    parser.add_argument(
        "--pacing",
        choices=("poisson", "fixed"),
        default="poisson",
        help="latency run: pauses drawn at random around the mean (poisson), or all equal "
        "(fixed: the connections stay in lock-step and arrive as one burst per period)",
    )
    parser.add_argument(
        "--hold",
        type=int,
        default=1000,
        help="after the runs, RSS of each proxy while this many client connections are open",
    )
    parser.add_argument(
        "--soak", type=int, default=0, help="then this many seconds at ~500 req/s: RSS growth"
    )
    parser.add_argument("--modes", default="", help="comma-separated mode names or prefixes")
    parser.add_argument(
        "--baseline",
        type=lambda path: Path(path).resolve(),  # the baseline's processes run in it
        default=None,
        help="another checkout of idemproxy with its own .venv (e.g. the commit the targets "
        "were set against), measured in the same run; the TARGETS table shows both",
    )
    parser.add_argument(
        "--curves", default="", help=f"run these cost curves instead: {','.join(CURVES)}"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the Python proxies"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and md")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.warmup, args.hold = 1, 1, 0, 50
    if not shutil.which("wrk"):
        print("bench: wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    report = run(args)
    report["targets"] = evaluate(report)
    if args.baseline is not None:
        report["baseline_targets"] = evaluate(report, BASELINE)
    table = markdown(report) + "\n" + targets_markdown(
        report["targets"], report.get("baseline_targets")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"bench-{stamp}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (args.out / f"bench-{stamp}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
