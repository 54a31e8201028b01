"""The resilience policies in a real `idemproxy run` process and in `idemproxy check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.faults import refusing_url
from tests.support.proxy_process import REPO, base_config
from tests.support.upstream import RecordingUpstream


def resilient_config(good: str, bad: str) -> dict[str, Any]:
    config = base_config(good)
    config["upstreams"]["app"] = {
        "targets": [{"url": bad, "weight": 1}, {"url": good, "weight": 1}],
        "connect_timeout": "1s",
        "timeout": "5s",
        "circuit_breaker": {"consecutive_failures": 1, "open_for": "1m"},
        "max_inflight": 50,
    }
    config["routes"] = [
        {
            "name": "limited",
            "match": {"path_prefix": "/limited"},
            "upstream": "app",
            "quota": {"key": "header:X-Tenant", "rate": "1/h", "burst": 2},
        },
        {"name": "default", "match": {"path_prefix": "/"}, "upstream": "app", "retries": {}},
    ]
    return config


async def test_policies_in_a_real_process(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proxy = proxy_process(resilient_config(upstream.url, refusing_url()))
    async with aiohttp.ClientSession() as session:
        # The first GET is picked onto the refusing target, retried on the good one; that
        # failure opens the bad target's circuit, so later requests all go to the good one.
        for i in range(4):
            async with session.get(f"{proxy.url}/r{i}") as response:
                assert response.status == 200
        assert upstream.count == 4
        statuses = []
        for _ in range(3):
            async with session.get(
                f"{proxy.url}/limited", headers={"X-Tenant": "acme"}
            ) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert response.headers["RateLimit-Policy"] == '"limited";q=2;w=7200'
                    assert int(response.headers["Retry-After"]) > 3500
        assert statuses == [200, 200, 429]


def test_check_prints_every_resilience_default(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    config = resilient_config("http://127.0.0.1:9", "http://127.0.0.1:10")
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout.split("\n\n")[0])
    breaker = effective["upstreams"]["app"]["circuit_breaker"]
    assert breaker["failure_statuses"] == [502, 503, 504]
    assert breaker["window"] == "10s"
    assert effective["routes"][1]["retries"]["backoff"] == "25ms"
    assert effective["routes"][1]["retries"]["on"] == ["not_sent"]
    assert effective["routes"][0]["quota"]["on_error"] == "fail_open"

    config["routes"][1]["retries"] = {"attempts": 0}
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert "routes[1].retries.attempts:" in result.stderr
