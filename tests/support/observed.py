"""An in-process proxy whose log lines and metrics the test can read (isolated per test)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.app import DataPlane, Runtime
from proxy.config import parse
from proxy.metrics import Metrics
from tests.conftest import ProxyTestServer


class Lines:
    """A LineWriter that keeps what it is given."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    def write(self, line: bytes, urgent: bool = False) -> None:
        self.raw.append(line)

    def json(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.raw]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Poll (with a deadline) until `count` lines were written; lines of a streamed response
        are written after the client has seen its end."""
        deadline = time.monotonic() + timeout
        while len(self.raw) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} log lines not written within {timeout}s: {self.raw}")
            await asyncio.sleep(0.01)
        return self.json()


@dataclass
class Observed:
    client: TestClient[web.Request, None]
    runtime: Runtime
    lines: Lines
    metrics: Metrics

    @property
    def port(self) -> int:
        assert self.client.port is not None
        return self.client.port

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the registry keyed by (name, sorted labels)."""
        from prometheus_client import generate_latest

        text = generate_latest(self.metrics.registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if isinstance(s, Sample)
        }


class _ObservedServer(ProxyTestServer):
    """Closes the runtime (upstream pools) together with the test server."""

    async def close(self) -> None:
        await super().close()
        await self.plane.runtime.close()


async def observe(aiohttp_client: Any, config: dict[str, Any]) -> Observed:
    """Start an in-process proxy from `config` (use with the `aiohttp_client` fixture)."""
    lines, metrics = Lines(), Metrics()
    runtime = Runtime(parse(config, env={}), metrics=metrics, log=lines)
    client = await aiohttp_client(_ObservedServer(DataPlane(runtime)), auto_decompress=False)
    return Observed(client, runtime, lines, metrics)
