"""The processes under test (upstream, nginx proxy, plain proxy, idemproxy, redis) and the
measurements taken from outside them: wrk runs and /proc counters."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_BODY = '{"ok":true,"service":"bench"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of one process (user space, kernel), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def memory_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status line such as VmRSS or VmHWM, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers), from /proc/<pid>/task/*/children."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                pids += process_tree(int(child))
    return pids


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port}")


def _wait_for_ready(admin_port: int, process: subprocess.Popen[bytes], what: str) -> None:
    """Until /ready answers 200: with `workers`, every worker is listening by then."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        ready = f"http://127.0.0.1:{admin_port}/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=1):
            return  # urlopen raises (HTTPError is an OSError) until it is 200
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready")


@dataclass
class Service:
    """One started process; `port` is where clients (wrk) connect."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    idle_rss_kib: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_times(self) -> tuple[float, float]:
        """User and kernel CPU time of the process and its workers."""
        times = [cpu_times(pid) for pid in process_tree(self.pid)]
        return sum(user for user, _ in times), sum(kernel for _, kernel in times)

    def memory_kib(self, key: str) -> int:
        """VmRSS or VmHWM summed over the process and its workers."""
        return sum(memory_kib(pid, key) for pid in process_tree(self.pid))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class Lab:
    """Starts services in a scratch directory, pinned to CPUs when asked, and stops them all."""

    workdir: Path
    pin: bool = True
    python: str = sys.executable  # the interpreter that runs the Python proxies
    services: list[Service] = field(default_factory=list)

    def _pinned(self, argv: list[str], cpu: int | tuple[int, ...]) -> list[str]:
        cpus = (cpu,) if isinstance(cpu, int) else cpu
        if self.pin and shutil.which("taskset") and (os.cpu_count() or 1) > max(cpus):
            return ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        return argv

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        cpu: int | tuple[int, ...],
        cwd: Path = REPO,
    ) -> Service:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            self._pinned(argv, cpu), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
        service = Service(name, process, port)
        self.services.append(service)
        _wait_for_port(port, process, name)
        time.sleep(0.2)  # let the runtime finish importing before reading idle memory
        service.idle_rss_kib = service.memory_kib("VmRSS")
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    # --- the processes ---------------------------------------------------------------------

    def _nginx(self, name: str, server_block: str, port: int, cpu: int) -> Service:
        root = self.workdir / name
        root.mkdir(exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    {server_block}
}}
"""
        )
        return self.start(name, ["nginx", "-p", str(root), "-c", str(conf)], port, cpu)

    def upstream(self, cpu: int, body: str = UPSTREAM_BODY) -> Service:
        """nginx `return 200` with a small JSON body (or `body`), else the shipped Python
        upstream."""
        port = free_port()
        if shutil.which("nginx"):
            return self._nginx(
                "upstream",
                f"""server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}""",
                port,
                cpu,
            )
        argv = [sys.executable, "-m", "bench.upstream", str(port), body]
        return self.start("upstream", argv, port, cpu)

    def nginx_proxy(self, upstream: Service, cpu: int) -> Service:
        port = free_port()
        return self._nginx(
            "nginx-proxy",
            f"""upstream app {{ server 127.0.0.1:{upstream.port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}""",
            port,
            cpu,
        )

    def python_proxy(self, name: str, module: str, upstream: Service, cpu: int) -> Service:
        """One of the reference proxies in bench/ (`plain_proxy`, `floor_proxy`)."""
        port = free_port()
        argv = [self.python, "-m", f"bench.{module}", str(port), upstream.url]
        return self.start(name, argv, port, cpu)

    def redis(self, cpu: int) -> Service:
        port = free_port()
        argv = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        return self.start(f"redis-{port}", argv, port, cpu)

    def idemproxy(
        self,
        name: str,
        config: dict[str, Any],
        cpu: int | tuple[int, ...],
        checkout: Path | None = None,
    ) -> Service:
        """`idemproxy run` of this repository, or of `checkout` (another build of idemproxy,
        with its own `.venv`) for a same-run comparison."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        python = self.python if checkout is None else str(checkout / ".venv" / "bin" / "python")
        argv = [python, "-m", "proxy", "run", "--config", str(path)]
        port = int(config["listen"]["port"])
        service = self.start(name, argv, port, cpu, cwd=checkout or REPO)
        _wait_for_ready(int(config["admin"]["port"]), service.process, name)
        service.idle_rss_kib = service.memory_kib("VmRSS")
        return service


def idemproxy_config(
    upstream: Service | str,
    *,
    store_url: str = "memory://",
    workers: int = 1,
    sized: bool = True,
) -> dict[str, Any]:
    """Pass-through on `/`, an idempotent POST route on `/idem` (only for one process or a
    shared store: workers share no memory); observability as shipped. `upstream` is a started
    service or its URL. `sized: False` leaves the memory store's bounds at their defaults (an
    older build without `store.max_bytes`)."""
    url = upstream if isinstance(upstream, str) else upstream.url
    app: dict[str, Any] = {"url": url, "connect_timeout": "2s", "timeout": "30s"}
    idempotent = {
        "name": "idem",
        "match": {"path_prefix": "/idem", "methods": ["POST"]},
        "upstream": "app",
        "idempotency": {"enabled": True},
    }
    shared = not store_url.startswith("memory:")
    store: dict[str, Any] = {"url": store_url}
    if not shared and sized:
        # A full run makes about 40,000 first executions (more as the proxy gets faster): at the
        # default 32MiB the store fills up in round 3 and answers 503, which is not the cost
        # being measured.
        store |= {"max_bytes": "512MiB", "max_records": 1_000_000}
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "workers": workers,
        "store": store,
        "upstreams": {"app": app},
        "routes": [
            *([idempotent] if workers == 1 or shared else []),
            {"name": "default", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    }


@dataclass(frozen=True)
class Load:
    """One wrk invocation: closed loop, or paced (a mean `delay_ms` per connection between
    requests, `pacing` as bench/wrk.lua describes it) for latency."""

    url: str
    connections: int
    seconds: int
    method: str = "GET"
    key: str = "none"
    delay_ms: int = 0
    pacing: str = "poisson"


def run_wrk(load: Load, cpu: int | None) -> dict[str, Any]:
    argv = [
        "wrk", "-t1", f"-c{load.connections}", f"-d{load.seconds}s", "--timeout", "5s",
        "-s", str(WRK_SCRIPT), load.url,
    ]  # fmt: skip
    if cpu is not None and shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        argv = ["taskset", "-c", str(cpu), *argv]
    env = {
        **os.environ,
        "BENCH_METHOD": load.method,
        "BENCH_KEY": load.key,
        "BENCH_DELAY_MS": str(load.delay_ms),
        "BENCH_PACING": load.pacing,
    }
    done = subprocess.run(argv, env=env, capture_output=True, check=True, timeout=load.seconds + 30)
    lines = [line for line in done.stdout.splitlines() if line.startswith(b"{")]
    if not lines:
        raise RuntimeError(f"wrk printed no report: {done.stdout!r} {done.stderr!r}")
    report: dict[str, Any] = orjson.loads(lines[-1])
    return report


def measure(service: Service, load: Load, client_cpu: int | None) -> dict[str, Any]:
    """One wrk run against `service`, with the CPU the service used meanwhile."""
    user_before, kernel_before = service.cpu_times()
    report = run_wrk(load, client_cpu)
    user_after, kernel_after = service.cpu_times()
    user, kernel = user_after - user_before, kernel_after - kernel_before
    used = user + kernel
    seconds = report["duration_us"] / 1e6
    requests = report["requests"]
    errors = sum(
        report[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx")
    )
    return {
        "requests": requests,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": report["p50_us"] / 1000,
        "p90_ms": report["p90_us"] / 1000,
        "p99_ms": report["p99_us"] / 1000,
        "cpu_s": used,
        "cpu_s_per_1k": used / requests * 1000 if requests else 0.0,
        # The split says where to cut: Python and C in the process, or system calls.
        "user_s_per_1k": user / requests * 1000 if requests else 0.0,
        "kernel_s_per_1k": kernel / requests * 1000 if requests else 0.0,
        "cores": used / seconds if seconds else 0.0,
        "errors": errors,
    }


@contextlib.contextmanager
def idle_connections(service: Service, count: int) -> Iterator[list[socket.socket]]:
    """`count` client connections to `service`, each left idle in keep-alive after one request
    (the state a browser or an SDK's pool leaves them in), closed on exit."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            sockets.append(sock)
            sock.sendall(request)
            sock.recv(65536)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def rss_with_connections(service: Service, count: int) -> int:
    """VmRSS (KiB) of `service` while `count` keep-alive clients each have made one request."""
    with idle_connections(service, count):
        return service.memory_kib("VmRSS")
