"""`workers: 2` against real processes: the supervisor, its two workers on one data port, a
real redis-server for the shared store."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.eventually import eventually
from tests.support.idempotency import idem_config
from tests.support.proxy_process import REPO, ProxyProcess, base_config
from tests.support.upstream import RecordingUpstream

GET_2XX = {"route": "default", "method": "GET", "status_class": "2xx"}


def access_lines(proc: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in proc.json_lines() if "trace_id" in line and "event" not in line]


def events(proc: ProxyProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in proc.json_lines() if line.get("event") == name]


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own (the kernel picks the worker per connection)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.read()


async def post(url: str, key: str, body: bytes) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status, dict(response.headers)


async def admin(proc: ProxyProcess, path: str, method: str = "GET") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, proc.admin_url + path) as response,
    ):
        return response.status, await response.text()


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return None


async def served_by(proc: ProxyProcess, trace_id: str) -> int:
    """The worker whose access log line carries this trace id."""

    async def workers() -> list[int]:
        return [int(line["worker"]) for line in access_lines(proc) if line["trace_id"] == trace_id]

    return (await eventually(workers, 5, f"the access line of {trace_id}"))[0]


async def worker_pids(proc: ProxyProcess) -> dict[int, int]:
    _, text = await admin(proc, "/health")
    checks = yaml.safe_load(text)["checks"]
    return {i: checks[f"worker:{i}"][0]["observedValue"] for i in (0, 1)}


async def test_connections_spread_over_both_workers_and_admin_aggregates_them(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proc = proxy_process(base_config(upstream.url, workers=2))
    statuses = [(await get(proc.url + "/spread"))[0] for _ in range(40)]
    assert statuses == [200] * 40

    def spread() -> list[dict[str, Any]] | None:
        lines = [line for line in access_lines(proc) if line["url.path"] == "/spread"]
        return lines if len(lines) == 40 else None

    lines = await eventually(lambda: asyncio.sleep(0, spread()), 5, "40 access lines")
    assert {line["worker"] for line in lines} == {0, 1}

    async def summed() -> float | None:
        total = sample((await admin(proc, "/metrics"))[1], "idemproxy_requests_total", GET_2XX)
        return total if total == 40 else None

    await eventually(summed, 5, "the supervisor's /metrics summing both workers")
    _, text = await admin(proc, "/metrics")
    assert sample(text, "idemproxy_workers") == 2
    assert sample(text, "idemproxy_worker_restarts_total") == 0

    status, text = await admin(proc, "/ready?verbose")
    assert status == 200
    assert "[+]worker:0 ok" in text and "[+]worker:1 ok" in text
    status, text = await admin(proc, "/health")
    document = yaml.safe_load(text)
    assert status == 200 and document["status"] in ("pass", "warn")
    assert set(document["workers"]) == {"0", "1"}

    assert proc.stop() == 0
    assert {line["worker"] for line in events(proc, "drained")} == {0, 1}
    assert events(proc, "supervisor_stopped")[-1]["exit_code"] == 0


async def test_a_retry_on_another_worker_is_replayed_from_the_shared_store(
    proxy_process: Any, upstream: RecordingUpstream, redis_server: Any
) -> None:
    redis = redis_server()
    proc = proxy_process({**idem_config(upstream.url, redis.url), "workers": 2})
    status, headers = await post(proc.url + "/v1/pay", "retry-across-workers", b'{"amount":5}')
    assert status == 200
    first = await served_by(proc, headers["X-Trace-Id"])
    other_worker = None
    for _ in range(30):  # fresh connections until the kernel picks the other worker
        status, headers = await post(proc.url + "/v1/pay", "retry-across-workers", b'{"amount":5}')
        assert (status, headers.get("Idempotent-Replayed")) == (200, "true")
        worker = await served_by(proc, headers["X-Trace-Id"])
        if worker != first:
            other_worker = worker
            break
    assert other_worker is not None
    assert [r.method for r in upstream.received] == ["POST"]  # executed exactly once


async def test_sighup_and_admin_reload_reach_every_worker(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proc = proxy_process(base_config(upstream.url, workers=2))
    changed = {**proc.config, "logging": {"query_allowlist": ["page"]}}
    proc.write_config(changed)
    proc.signal(signal.SIGHUP)

    def reloaded() -> list[dict[str, Any]]:
        return [line for line in events(proc, "config_reload") if line["result"] == "success"]

    await eventually(lambda: asyncio.sleep(0, len(reloaded()) == 2), 10, "both workers reloaded")
    assert {line["worker"] for line in reloaded()} == {0, 1}
    assert {line["trigger"] for line in reloaded()} == {"signal"}

    status, text = await admin(proc, "/admin/reload", "POST")
    assert status == 200
    results = yaml.safe_load(text)["workers"]
    assert {i: r["result"] for i, r in results.items()} == {"0": "unchanged", "1": "unchanged"}

    proc.write_config({**changed, "workers": 3})
    status, text = await admin(proc, "/admin/reload", "POST")
    assert status == 422
    for result in yaml.safe_load(text)["workers"].values():
        assert result["result"] == "failure"
        assert any(e.startswith("workers: changed from 2 to 3") for e in result["error"])


async def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proc = proxy_process(base_config(upstream.url, workers=2))
    before = await worker_pids(proc)
    os.kill(before[0], signal.SIGKILL)
    exited = await eventually(
        lambda: asyncio.sleep(0, events(proc, "worker_exited")), 5, "worker_exited"
    )
    assert exited[0]["worker"] == 0 and exited[0]["signal"] == "SIGKILL"
    assert exited[0]["expected"] is False

    statuses = [(await get(proc.url + "/meanwhile"))[0] for _ in range(10)]
    assert statuses == [200] * 10

    async def restarted() -> bool:
        pids = await worker_pids(proc)
        ready, _ = await admin(proc, "/ready")
        return pids[0] not in (None, before[0]) and pids[1] == before[1] and ready == 200

    await eventually(restarted, 15, "worker 0 restarted and ready")
    _, text = await admin(proc, "/metrics")
    assert sample(text, "idemproxy_worker_restarts_total") == 1
    assert sample(text, "idemproxy_workers") == 2
    assert (await get(proc.url + "/after"))[0] == 200


def run_idemproxy(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_workers_crash_looping_at_startup_stop_the_supervisor(tmp_path: Path) -> None:
    with socket.socket() as taken:  # a plain listener: SO_REUSEPORT binds fail on it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = base_config("http://127.0.0.1:9", workers=2)
        config["listen"]["port"] = taken.getsockname()[1]
        path = tmp_path / "proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_idemproxy(["run", "--config", str(path)])
    assert result.returncode == 1
    assert "exited 5 times in a row within 10s of starting" in result.stderr
    assert "address already in use" in result.stderr


def test_memory_store_with_workers_is_refused_at_run_and_check_prints_workers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({**idem_config("http://127.0.0.1:9", "memory://"), "workers": 2}))
    for command in ("run", "check"):
        result = run_idemproxy([command, "--config", str(path)])
        assert result.returncode == 1
        assert "  workers: 2 worker processes require a shared store" in result.stderr
        assert "routes[0].idempotency" in result.stderr

    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9", workers="auto")))
    result = run_idemproxy(["check", "--config", str(path)])
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout.split("\nROUTE ")[0])["workers"] == len(
        os.sched_getaffinity(0)
    )
