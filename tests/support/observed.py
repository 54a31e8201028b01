"""An in-process proxy whose log lines and metrics the test can read (isolated per test)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.config import parse
from proxy.observability.metrics import Metrics
from proxy.pipeline.runtime import DataPlane, Runtime
from tests.conftest import ProxyTestServer
from tests.support.lines import Lines


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
    client = await aiohttp_client(_ObservedServer(DataPlane(runtime), lines), auto_decompress=False)
    return Observed(client, runtime, lines, metrics)
