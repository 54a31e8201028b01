"""The README quick start, as a newcomer runs it: the example service and `idemproxy run` with
config/proxy.yaml (ports moved to free ones through the environment)."""

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support.ports import free_port, wait_until
from tests.support.proxy_process import REPO


def _get(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


@pytest.fixture
def quickstart() -> Iterator[tuple[str, str]]:
    app_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "IDEMPROXY_PORT": str(proxy_port),
        "IDEMPROXY_ADMIN_PORT": str(admin_port),
        "IDEMPROXY_UPSTREAM": f"http://127.0.0.1:{app_port}",
    }
    app = subprocess.Popen(
        [sys.executable, "deploy/example/recognitions.py", "--port", str(app_port)], cwd=REPO
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", "config/proxy.yaml"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{app_port}/healthz"), 15, "example service")
        wait_until(lambda: _get(f"http://127.0.0.1:{admin_port}/live"), 15, "idemproxy")
        yield f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{proxy_port}"
    finally:
        for process in (proxy, app):
            process.terminate()
            process.wait(30)


async def test_the_curl_walkthrough(quickstart: tuple[str, str]) -> None:
    direct, proxied = quickstart
    body = {"to": "ada"}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(direct + "/recognitions", json=body) as response:
                assert response.status == 201
        key = {"Idempotency-Key": "5f0c1e9a-demo"}
        async with session.post(proxied + "/recognitions", json=body, headers=key) as first:
            assert first.status == 201
            created = await first.json()
        async with session.post(proxied + "/recognitions", json=body, headers=key) as retry:
            assert retry.status == 201
            assert retry.headers["Idempotent-Replayed"] == "true"
            assert await retry.json() == created
        async with session.post(
            proxied + "/recognitions", json={"to": "someone else"}, headers=key
        ) as mismatch:
            assert mismatch.status == 422
        async with session.get(proxied + "/recognitions") as listing:
            assert (await listing.json())["count"] == 3
