"""`idemproxy check --connect`: validates, then probes the store and every upstream target."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.support.ports import free_port
from tests.support.proxy_process import REPO, base_config
from tests.support.upstream import RecordingUpstream


async def check_connect(config: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    """Run the CLI without blocking the loop that serves the in-process upstream."""
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "check",
        "--config",
        str(path),
        "--connect",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def test_reachable_upstreams_exit_0(upstream: RecordingUpstream, tmp_path: Path) -> None:
    config = base_config(upstream.url)
    config["upstreams"]["checked"] = {"url": upstream.url, "health": {"path": "/healthz"}}
    code, out = await check_connect(config, tmp_path)
    assert code == 0, out
    report = out.split("ROUTE")[1].splitlines()
    assert any(line.startswith("store memory: pass 0.0 ms") for line in report)
    assert any(line.startswith(f"upstream app {upstream.url}/: pass ") for line in report)
    assert any(
        line.startswith(f"upstream checked {upstream.url}/healthz: pass ") for line in report
    )
    assert {r.raw_path for r in upstream.received} == {"/", "/healthz"}


async def test_unreachable_upstream_exits_3(upstream: RecordingUpstream, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = base_config(upstream.url)
    config["upstreams"]["gone"] = {"url": dead}
    code, out = await check_connect(config, tmp_path)
    assert code == 3
    assert f"upstream gone {dead}/: fail" in out
    assert f"upstream app {upstream.url}/: pass" in out


async def test_failing_health_path_exits_3(upstream: RecordingUpstream, tmp_path: Path) -> None:
    async def unhealthy(request: web.Request) -> web.Response:
        return web.Response(status=500)

    upstream.respond = unhealthy
    config = base_config(upstream.url)
    config["upstreams"]["app"]["health"] = {"path": "/healthz"}
    code, out = await check_connect(config, tmp_path)
    assert code == 3
    assert "(HTTP 500)" in out


async def test_unreachable_store_exits_3(
    upstream: RecordingUpstream, redis_server: Any, tmp_path: Path
) -> None:
    redis = redis_server()
    config = base_config(upstream.url, store={"url": redis.url, "timeout": "200ms"})
    code, out = await check_connect(config, tmp_path)
    assert code == 0, out
    assert "store eviction policy: pass noeviction" in out
    redis.stop()
    code, out = await check_connect(config, tmp_path)
    assert code == 3
    assert "store redis: fail" in out
