"""Redis Sentinel (3 sentinels, primary, replica) and a 3-node Redis Cluster on loopback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.ports import free_port, wait_until
from tests.support.redis_server import RedisServer, ping

SERVICE = "mymaster"


def _cli(port: int, *args: str) -> str:
    result = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True, text=True, timeout=10, check=True,
    )
    return result.stdout.strip()


class Sentinels:
    """A primary, one replica and three sentinels watching them as `mymaster`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(
            workdir / "replica", None, "--replicaof", "127.0.0.1", str(self.primary.port)
        )
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> Sentinels:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not on PATH")
        self.primary.start()
        self.replica.start()
        wait_until(lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"),
                   10, "replica in sync")
        for port in self.ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            log = open(self.workdir / f"sentinel-{port}.log", "ab")  # noqa: SIM115
            self.processes.append(
                subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
            )
        for port in self.ports:
            wait_until(lambda p=port: ping(p), 10, f"sentinel on {port}")
            wait_until(lambda p=port: self._knows_replica(p), 15, f"sentinel {port} sees replica")
        return self

    def _knows_replica(self, port: int) -> bool:
        return str(self.replica.port) in _cli(port, "SENTINEL", "REPLICAS", SERVICE)

    def primary_port(self) -> int:
        return int(_cli(self.ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()[-1])

    def failover(self) -> None:
        """Promote the replica (a forced failover) and wait until the sentinels agree."""
        old = self.primary_port()
        # Refused (NOGOODSLAVE) until the sentinels have fresh INFO from the replica.
        wait_until(lambda: _cli(self.ports[0], "SENTINEL", "FAILOVER", SERVICE) == "OK", 15,
                   "failover accepted")
        wait_until(lambda: self.primary_port() != old, 15, "failover")
        promoted = self.replica if self.replica.port != old else self.primary
        wait_until(lambda: "role:master" in promoted.cli("INFO", "replication"), 15,
                   "promoted replica accepts writes")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.replica.stop()
        self.primary.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            try:
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


class Cluster:
    """Three primaries, no replicas, all 16384 slots assigned."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [
            RedisServer(
                workdir / f"node-{i}", port, "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "2000",
            )
            for i, port in enumerate(_cluster_port() for _ in range(3))
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        for node in self.nodes:
            wait_until(lambda n=node: "cluster_state:ok" in n.cli("CLUSTER", "INFO"), 15,
                       f"cluster state ok on {node.port}")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
