import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from tests.support.proxy_process import REPO

CONFIGS = sorted((REPO / "config").rglob("*.yaml"))


def idemproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )


def test_there_are_configs_to_check() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_check_accepts_every_shipped_config(path: Path) -> None:
    result = idemproxy("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout.split("\nROUTE ")[0])
    assert effective["limits"]["max_request_body"]  # every default is resolved
    assert "ROUTE" in result.stdout and "IDEMPOTENCY" in result.stdout


def test_check_prints_resolved_defaults_and_the_route_table() -> None:
    result = idemproxy("check", "--config", "config/proxy.yaml")
    effective = yaml.safe_load(result.stdout.split("\nROUTE ")[0])
    assert effective["store"] == {
        "url": "memory://", "timeout": "250ms", "on_error": "fail_closed", "max_records": 100000,
        "max_bytes": "32MiB",
    }
    assert effective["routes"][0]["idempotency"]["ttl"] == "24h"
    table = result.stdout.split("\nROUTE ")[1]
    assert "recognitions  /recognitions  POST" in table
    assert "optional no scope" in table


def test_invalid_config_exits_1_and_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "upstreams: {payments: {url: 'http://h'}}\n"
        "routes:\n  - {name: a, upstream: payments}\n  - {name: b, upstream: paymnts}\n"
    )
    result = idemproxy("check", "--config", str(path))
    assert result.returncode == 1
    assert "routes[1].upstream: unknown upstream 'paymnts' (did you mean 'payments'?)" in result.stderr
    assert result.stdout == ""


def test_run_with_invalid_config_exits_1(tmp_path: Path) -> None:
    result = idemproxy("run", "--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 1
    assert "cannot read config file" in result.stderr


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("upstreams: {a: {url: 'http://h'}}\nroutes: [{name: r, upstream: a}]\n")
    result = idemproxy("check", env={"IDEMPROXY_CONFIG": str(path), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "\nr      /      *        a         off\n" in result.stdout


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["check", "--nope"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = idemproxy(*args)
    assert result.returncode == 2
    assert "usage: idemproxy" in result.stderr


def test_version() -> None:
    result = idemproxy("version")
    assert (result.returncode, result.stdout) == (0, f"idemproxy {__version__}\n")


def test_check_redacts_secrets(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text(
        "store: {url: 'redis://:hunter2@127.0.0.1:6379/0'}\n"
        "logging: {hash_salt: pepper}\n"
        "upstreams: {a: {url: 'http://h'}}\nroutes: [{name: r, upstream: a}]\n"
    )
    result = idemproxy("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "pepper" not in result.stdout
    effective = yaml.safe_load(result.stdout.split("\nROUTE ")[0])
    assert effective["store"]["url"] == "redis://***@127.0.0.1:6379/0"
    assert effective["logging"]["hash_salt"] == "***"
