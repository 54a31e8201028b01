"""Shared fixtures: a recording upstream, real redis-server processes, idemproxy as a
subprocess, and an in-process proxy for fast logic tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient
from yarl import URL

from proxy.config import parse
from proxy.pipeline.runtime import DataPlane, Runtime
from proxy.server.listener import DataServer
from tests.support.lines import Lines
from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.redis_server import RedisServer
from tests.support.secrets import assert_no_secrets
from tests.support.upstream import RecordingUpstream


class ProxyTestServer(BaseTestServer):
    """The real data-port server (parser limits included) on an ephemeral port; `lines` holds
    the access log lines of a runtime built with it as its log sink. aiohttp's test client
    talks to it; aiohttp's own server plays no part."""

    def __init__(self, plane: DataPlane, lines: Lines, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plane = plane
        self.lines = lines
        self.data: DataServer | None = None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.data is not None:
            return
        self.data = DataServer(self.plane, self.plane.runtime.config.limits)
        self.port = await self.data.listen(self.host, 0)
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    @property
    def started(self) -> bool:
        return self.data is not None

    async def close(self) -> None:
        if self.data is not None and not self._closed:
            await self.data.stop_listening()
            await self.data.shutdown()
            self._closed = True

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        raise NotImplementedError("the data server is started directly (start_server)")


@pytest.fixture
async def upstream(aiohttp_server: Any) -> RecordingUpstream:
    recording = RecordingUpstream()
    server = await aiohttp_server(recording.app, auto_decompress=False)
    recording.url = str(server.make_url("")).rstrip("/")
    return recording


MakeProxy = Callable[..., Awaitable[TestClient[web.Request, None]]]


@pytest.fixture
async def make_proxy(aiohttp_client: Any) -> AsyncIterator[MakeProxy]:
    """Build an in-process proxy from a config dict (ports in it are ignored). Its access log
    lines are kept in memory, not written to stdout: read them as `client.server.lines`."""
    runtimes: list[Runtime] = []

    async def factory(config: dict[str, Any]) -> TestClient[web.Request, None]:
        lines = Lines()
        runtime = Runtime(parse(config, env={}), log=lines)
        runtimes.append(runtime)
        client: TestClient[web.Request, None] = await aiohttp_client(
            ProxyTestServer(DataPlane(runtime), lines), auto_decompress=False
        )
        return client

    yield factory
    for runtime in runtimes:
        await runtime.close()


@pytest.fixture
async def proxy(upstream: RecordingUpstream, make_proxy: MakeProxy) -> TestClient[web.Request, None]:
    """An in-process proxy with one catch-all route to the recording upstream."""
    return await make_proxy(base_config(upstream.url))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: start a real redis-server on a free port; all are stopped at teardown."""
    servers: list[RedisServer] = []

    def factory(*extra: str, port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", port, *extra).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: start `idemproxy run` as a subprocess; all are stopped at teardown, and their
    whole output is scanned for secrets (no Authorization, cookie, raw key or query string)."""
    processes: list[ProxyProcess] = []

    def factory(config: dict[str, Any], env: dict[str, str] | None = None) -> ProxyProcess:
        process = ProxyProcess(tmp_path / f"proxy-{len(processes)}", config, env).start()
        processes.append(process)
        return process

    yield factory
    for process in processes:
        process.stop()
    for process in processes:
        assert_no_secrets(process.stdout() + process.stderr())


# What a test needs, marked from what it uses, so `-m "not process and not redis and not slow"`
# (`make test-fast`) is the quick lane without anyone having to remember a marker.
_REDIS_FIXTURES = {"redis_server", "redis_sentinels", "redis_cluster"}
_PROCESS_FIXTURES = {"proxy_process", "stack"}
_PROCESS_SOURCES = ("ProxyProcess(", "subprocess", "Sentinels(", "Cluster(")
_REDIS_SOURCES = ("RedisServer(", "Sentinels(", "Cluster(")
_sources: dict[Path, str] = {}


def _source(path: Path) -> str:
    if path not in _sources:
        _sources[path] = path.read_text(encoding="utf-8")
    return _sources[path]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        source = _source(Path(str(item.path)))
        if (names & _REDIS_FIXTURES and params.get("store_url", "redis") == "redis") or any(
            s in source for s in _REDIS_SOURCES
        ):
            item.add_marker(pytest.mark.redis)
        if names & _PROCESS_FIXTURES or any(s in source for s in _PROCESS_SOURCES):
            item.add_marker(pytest.mark.process)
