"""Config reload against a real process: SIGHUP, POST /admin/reload and a Kubernetes-style
ConfigMap symlink swap; a bad file never replaces the running config."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.config import config_hash, parse
from proxy.server.reload import file_signature, restart_required, watch
from tests.support.eventually import eventually
from tests.support.idempotency import idem_config
from tests.support.ports import free_port
from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.upstream import RecordingUpstream


def only_v1(upstream_url: str, **over: Any) -> dict[str, Any]:
    config = base_config(upstream_url, **over)
    config["routes"] = [{"name": "v1", "match": {"path_prefix": "/v1"}, "upstream": "app"}]
    return config


def with_catch_all(config: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    changed["routes"].append({"name": "rest", "match": {"path_prefix": "/"}, "upstream": "app"})
    return changed


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def health_of(proc: ProxyProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(proc.admin_url + "/health") as r:
        document: dict[str, Any] = await r.json(content_type="application/health+json")
        return document


async def admin_reload(proc: ProxyProcess) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proc.admin_url + "/admin/reload") as response,
    ):
        return response.status, await response.json()


def hash_of(config: dict[str, Any]) -> str:
    return config_hash(parse(config, env={}))


def reload_events(proc: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in proc.json_lines() if line.get("event") == "config_reload"]


async def logged_reloads(
    proc: ProxyProcess, count: int, result: str | None = None
) -> list[dict[str, Any]]:
    """The `config_reload` events (of `result`) once `count` are in the output: the log writer
    thread may still hold the last one when the reload's effect is already visible."""

    async def logged() -> list[dict[str, Any]] | None:
        events = [e for e in reload_events(proc) if result in (None, e["result"])]
        return events if len(events) >= count else None

    return await eventually(logged, 5, f"{count} config_reload events in the output")


async def test_sighup_swaps_in_the_new_config_and_logs_both_hashes(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    config = only_v1(upstream.url, reload={"watch": False})
    proc = proxy_process(config)
    assert await status_of(proc.url + "/other") == 404

    proc.write_config(with_catch_all(config))
    proc.signal(signal.SIGHUP)

    async def applied() -> bool:
        return await status_of(proc.url + "/other") == 200

    await eventually(applied, 10, "the reloaded route")
    assert await status_of(proc.url + "/v1/x") == 200
    (event,) = await logged_reloads(proc, 1)
    assert event["result"] == "success"
    assert event["trigger"] == "signal"
    assert event["old_hash"] == hash_of(config)
    assert event["hash"] == hash_of(proc.config)
    doc = await health_of(proc)
    assert doc["status"] == "pass"
    assert doc["releaseId"] == hash_of(proc.config)
    assert doc["checks"]["config:reload"][0]["history"][-1]["result"] == "success"


async def test_bad_reloads_keep_the_last_good_config(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    config = only_v1(upstream.url, reload={"watch": False})
    proc = proxy_process(config)
    running = hash_of(config)

    async def rejected(text: str, expected: str) -> dict[str, Any]:
        proc.config_path.write_text(text)
        status, attempt = await admin_reload(proc)
        assert status == 422
        assert attempt["result"] == "failure"
        assert attempt["hash"] == running
        assert any(expected in line for line in attempt["error"]), attempt["error"]
        assert await status_of(proc.url + "/v1/still") == 200
        assert await status_of(proc.url + "/other") == 404  # the new routes are not half-applied
        doc = await health_of(proc)
        assert doc["status"] == "warn"
        assert doc["releaseId"] == running
        check = doc["checks"]["config:reload"][0]
        assert check["status"] == "warn"
        assert check["observedValue"] == running
        assert expected in check["output"]
        return check

    good = with_catch_all(config)
    await rejected("routes: [unclosed\n", "invalid YAML")
    typo = copy.deepcopy(good)
    typo["routes"][1]["upstreem"] = typo["routes"][1].pop("upstream")
    await rejected(
        yaml.safe_dump(typo), "routes[1].upstreem: unknown key (did you mean 'upstream'?)"
    )
    moved = copy.deepcopy(good)
    moved["listen"]["port"] = free_port()
    check = await rejected(yaml.safe_dump(moved), "listen: changed from")
    assert "restart" in check["output"]
    assert [h["result"] for h in check["history"]] == ["failure"] * 3

    proc.write_config(good)
    status, attempt = await admin_reload(proc)
    assert (status, attempt["result"]) == (200, "success")
    assert await status_of(proc.url + "/other") == 200
    assert (await health_of(proc))["status"] == "pass"
    status, attempt = await admin_reload(proc)
    assert (status, attempt["result"]) == (200, "unchanged")
    failures = await logged_reloads(proc, 3, "failure")
    assert len(failures) == 3
    assert all(e["level"] == "error" and e["running_hash"] == running for e in failures)


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()

    async def gated(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="finished")

    upstream.respond = gated
    upstream.arrived.clear()
    config = base_config(upstream.url, reload={"watch": False})
    proc = proxy_process(config)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(proc.url + "/slow"))
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        proc.write_config(
            only_v1(
                upstream.url,
                listen=config["listen"],
                admin=config["admin"],
                reload={"watch": False},
            )
        )
        status, attempt = await admin_reload(proc)
        assert (status, attempt["result"]) == (200, "success")
        assert await status_of(proc.url + "/slow") == 404  # new requests see the new routes
        release.set()
        response = await pending
        assert response.status == 200
        assert await response.text() == "finished"


async def test_the_memory_store_outlives_a_reload(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    config = idem_config(upstream.url, "memory://")
    config["reload"] = {"watch": False}
    proc = proxy_process(config)
    headers = {"Idempotency-Key": "kept"}
    async with aiohttp.ClientSession() as session:
        async with session.post(proc.url + "/v1/pay", json={}, headers=headers) as response:
            assert response.status == 200
        changed = copy.deepcopy(config)
        changed["routes"][0]["idempotency"]["ttl"] = "1h"
        proc.write_config(changed)
        status, attempt = await admin_reload(proc)
        assert (status, attempt["result"]) == (200, "success")
        async with session.post(proc.url + "/v1/pay", json={}, headers=headers) as replay:
            assert replay.headers["Idempotent-Replayed"] == "true"
    assert upstream.count == 1


class ConfigMapProxy(ProxyProcess):
    """The config mounted as the kubelet mounts a ConfigMap volume: `proxy.yaml ->
    ..data/proxy.yaml`, `..data -> ..<timestamp>`; an update writes a new timestamped
    directory and renames a fresh `..data_tmp` symlink over `..data` (atomic)."""

    generation = 0

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.publish(yaml.safe_dump(self.config))

    def publish(self, text: str) -> None:
        volume = self.workdir / "configmap"
        volume.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        version = volume / f"..2026_11_28_12_00_{self.generation:02d}.{os.getpid()}"
        version.mkdir()
        (version / "proxy.yaml").write_text(text)
        os.symlink(version.name, volume / "..data_tmp")
        os.replace(volume / "..data_tmp", volume / "..data")
        self.config_path = volume / "proxy.yaml"
        if not self.config_path.is_symlink():
            os.symlink("..data/proxy.yaml", self.config_path)


async def test_configmap_symlink_swap_is_reloaded(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = only_v1(upstream.url, reload={"poll_interval": "100ms", "debounce": "100ms"})
    proc = ConfigMapProxy(tmp_path / "proxy", config).start()
    try:
        assert proc.config_path.is_symlink()
        assert await status_of(proc.url + "/other") == 404
        before = os.stat(proc.config_path).st_mtime_ns

        proc.write_config(with_catch_all(config))

        async def applied() -> bool:
            return await status_of(proc.url + "/other") == 200

        await eventually(applied, 10, "the swapped ConfigMap")
        assert os.stat(proc.config_path).st_mtime_ns >= before
        (event,) = await logged_reloads(proc, 1)
        assert (event["trigger"], event["result"]) == ("file", "success")

        proc.publish("routes: [unclosed\n")

        async def warned() -> bool:
            return (await health_of(proc))["status"] == "warn"

        await eventually(warned, 10, "the failed swap in /health")
        assert await status_of(proc.url + "/other") == 200
    finally:
        proc.stop()


def test_only_listener_settings_need_a_restart() -> None:
    config = base_config("http://127.0.0.1:1")
    running = parse(config, env={})
    changed = copy.deepcopy(config)
    changed["limits"] = {"max_header_bytes": "8KiB", "max_request_body": "1MiB"}
    changed["shutdown"] = {"drain_delay": "1s", "timeout": "9s"}
    problems = restart_required(running, parse(changed, env={}))
    assert problems == [
        "limits.max_header_bytes: changed from 16KiB to 8KiB; this needs a restart "
        "(the running config is kept)"
    ]


async def test_watch_debounces_a_file_written_in_steps(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("a: 1\n")
    calls: list[Any] = []

    async def changed() -> None:
        calls.append(file_signature(path))

    watcher = asyncio.create_task(watch(path, 0.02, 0.2, changed))
    try:
        await asyncio.sleep(0.05)
        for step in range(4):  # an editor writing in several steps, each within the debounce
            path.write_text(f"a: {step}\n" * (step + 1))
            await asyncio.sleep(0.05)
        await eventually(lambda: asyncio.sleep(0, calls), 5, "the debounced change")
        await asyncio.sleep(0.3)
        assert calls == [file_signature(path)]
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
