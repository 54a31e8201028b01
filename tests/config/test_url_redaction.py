"""Credentials in upstream and store URLs reach no surface: problem details, /metrics, /health,
reload answers, logs, `idemproxy check` (with and without --connect)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.urls import redact_url
from tests.support.eventually import eventually
from tests.support.ports import free_port
from tests.support.proxy_process import REPO, ProxyProcess, base_config
from tests.support.redis_server import RedisServer
from tests.support.upstream import RecordingUpstream

SECRET = "S3cret"
# Passwords with '@' (the old `check` masking stopped at the first one) and '/'.
UPSTREAM_PASSWORD = f"p@{SECRET}up"
TARGET_PASSWORD = f"{SECRET}tg"
STORE_PASSWORD = f"p@{SECRET}st"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@h:1/base", "http://***@h:1/base"),
        ("http://user:p@ss@h:1", "http://***@h:1"),
        ("redis://:p@ss@h:6379/0", "redis://***@h:6379/0"),
        ("https://sk_live_key@api.example", "https://***@api.example"),  # a user alone is secret
        ("redis://u:pa/ss@h:6379", "redis://***@h:6379"),  # malformed: '/' in the password
        ("rediss://u:p@h/0?ssl_ca_certs=/a@b", "rediss://***@h/0?ssl_ca_certs=/a@b"),
        ("redis+sentinel://u:p@a:1,b:2/m/0", "redis+sentinel://***@a:1,b:2/m/0"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_masks_the_whole_userinfo(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def idemproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


async def test_credentials_in_urls_reach_no_surface(
    upstream: RecordingUpstream,
    proxy_process: Callable[..., ProxyProcess],
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = redis_server("--requirepass", STORE_PASSWORD)
    dead = f"http://user:{UPSTREAM_PASSWORD}@127.0.0.1:{free_port()}"
    live = upstream.url.replace("http://", f"http://t:{TARGET_PASSWORD}@")
    config: dict[str, Any] = base_config(
        dead,
        store={"url": f"redis://:{STORE_PASSWORD}@127.0.0.1:{redis.port}/0"},
        routes=[
            {"name": "dead", "match": {"path_prefix": "/dead"}, "upstream": "app"},
            {"name": "live", "match": {"path_prefix": "/"}, "upstream": "live"},
        ],
    )
    config["upstreams"]["app"]["circuit_breaker"] = {"consecutive_failures": 50}
    config["upstreams"]["app"]["health"] = {"interval": "100ms", "required": False}
    config["upstreams"]["live"] = {"targets": [{"url": live}], "health": {"interval": "100ms"}}
    config["reload"] = {"watch": False}
    proxy = proxy_process(config)
    seen: dict[str, str] = {}

    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/dead/pay", data=b"x") as response:
            assert response.status == 502
            seen["502 problem"] = await response.text()
        async with session.get(proxy.url + "/ok") as response:
            assert response.status == 200  # the target's credentials did not stop it working

        async def health() -> str:
            async with session.get(proxy.admin_url + "/health") as response:
                text = await response.text()
            return "" if "not checked yet" in text else text

        seen["/health"] = await eventually(health, 10, "every target checked")
        async with session.get(proxy.admin_url + "/metrics") as response:
            seen["/metrics"] = await response.text()
        assert "idemproxy_circuit_state" in seen["/metrics"]

        # Reload answers: a restart-only store change, then a bad upstream URL.
        changed = {**config, "store": {"url": f"redis://:{STORE_PASSWORD}x@127.0.0.1:1/0"}}
        proxy.write_config(changed)
        async with session.post(proxy.admin_url + "/admin/reload") as response:
            assert response.status == 422
            seen["reload: restart needed"] = await response.text()
        assert "store.url" in seen["reload: restart needed"]
        bad = {**config, "upstreams": {**config["upstreams"],
                                       "app": {"url": dead + ":99x/"}}}
        proxy.write_config(bad)
        async with session.post(proxy.admin_url + "/admin/reload") as response:
            assert response.status == 422
            seen["reload: invalid URL"] = await response.text()
        assert "upstreams.app.url" in seen["reload: invalid URL"]
        proxy.write_config(config)

    seen["check"] = idemproxy("check", "--config", str(proxy.config_path)).stdout
    assert "upstreams" in seen["check"]
    connect = idemproxy("check", "--connect", "--config", str(proxy.config_path))
    seen["check --connect"] = connect.stdout + connect.stderr
    bad_path = proxy.workdir / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    invalid = idemproxy("check", "--config", str(bad_path))
    assert invalid.returncode == 1
    seen["check: invalid"] = invalid.stdout + invalid.stderr
    seen["logs"] = proxy.stdout() + proxy.stderr()

    leaked = {surface: text for surface, text in seen.items() if SECRET in text}
    assert not leaked, leaked
    assert "***@127.0.0.1" in seen["502 problem"]  # still says which upstream failed
