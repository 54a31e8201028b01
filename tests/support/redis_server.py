"""A real redis-server on a free loopback port that a test can stop, stall, kill and restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.support.ports import free_port, wait_until


def ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, maybe with a password


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self._may_move = port is None  # a port we picked: pick again if someone takes it first
        self.workdir = workdir
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            args = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--maxmemory-policy", "noeviction", *self.extra,
            ]
            log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
            process = self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            # Up when it answers; gone when it could not bind (another process took the port).
            wait_until(lambda p=process: p.poll() is not None or ping(self.port), 10,
                       f"redis-server on port {self.port}")
            if process.poll() is None:
                self._may_move = False  # restarts keep the URL the test already holds
                return self
            if not self._may_move:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server could not start on port {self.port}: see {log.name}")

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return result.stdout.strip()

    def stall(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None
