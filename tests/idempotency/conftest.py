from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import MakeProxy
from tests.support.idempotency import idem_config
from tests.support.redis_server import RedisServer
from tests.support.upstream import RecordingUpstream

IdemProxy = Callable[..., Awaitable[TestClient[web.Request, None]]]


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest, redis_server: Callable[..., RedisServer]) -> str:
    """The contract suite runs once against each store."""
    if request.param == "memory":
        return "memory://"
    return redis_server().url


@pytest.fixture
def idem_proxy(upstream: RecordingUpstream, make_proxy: MakeProxy, store_url: str) -> IdemProxy:
    """In-process proxy whose route `/v1` is idempotent with the given policy overrides."""

    async def factory(
        store: dict[str, Any] | None = None,
        upstream_options: dict[str, Any] | None = None,
        **policy: Any,
    ) -> TestClient[web.Request, None]:
        config = idem_config(
            upstream.url, store_url, store=store, upstream=upstream_options, **policy
        )
        return await make_proxy(config)

    return factory
