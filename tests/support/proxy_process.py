"""`idemproxy run` as a real subprocess with a generated config, ready when /live answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.support.ports import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def base_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A minimal valid config dict on free ports; `overrides` replace top-level keys."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstreams": {"app": {"url": upstream_url, "connect_timeout": "1s", "timeout": "5s"}},
        "routes": [{"name": "default", "match": {"path_prefix": "/"}, "upstream": "app"}],
        "shutdown": {"drain_delay": "0s", "timeout": "5s"},
    }
    config.update(overrides)
    return config


class ProxyProcess:
    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "proxy.yaml"
        self.stdout_path = workdir / "proxy.stdout"
        self.stderr_path = workdir / "proxy.stderr"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        listen = self.config["listen"]
        return f"http://{listen['host']}:{listen['port']}"

    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    @property
    def admin_url(self) -> str:
        admin = self.config["admin"]
        return f"http://{admin['host']}:{admin['port']}"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config))
        tmp.replace(self.config_path)

    def start(self, timeout: float = 15, attempts: int = 3) -> ProxyProcess:
        """Start and wait for /live. A free port can be taken by another process between
        free_port() and the bind; then the ports are chosen again (at most `attempts` times)."""
        for attempt in range(attempts):
            self.write_config()
            errors_before = len(self.stderr())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)],
                cwd=REPO,
                env=self.env,
                stdout=open(self.stdout_path, "ab"),  # noqa: SIM115
                stderr=open(self.stderr_path, "ab"),  # noqa: SIM115
            )
            up = wait_until(self._live_or_exited, timeout, "idemproxy /live")
            if up == "live":
                return self
            lost_race = "address already in use" in self.stderr()[errors_before:]
            if not lost_race or attempt == attempts - 1:
                raise RuntimeError(f"idemproxy exited: {self.stderr()[errors_before:]}")
            self.config["listen"]["port"] = free_port()
            self.config["admin"]["port"] = free_port()
        raise AssertionError("unreachable")

    def _live_or_exited(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return "exited"
        return "live" if self._live() else None

    def _live(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"idemproxy exited with {self.process.returncode}: {self.stderr()}")
        with urllib.request.urlopen(self.admin_url + "/live", timeout=1) as response:
            return bool(response.status == 200)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stdout(self) -> str:
        return self.stdout_path.read_text() if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def json_lines(self) -> list[dict[str, Any]]:
        """Every JSON line the proxy wrote to stdout."""
        return [orjson.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]
