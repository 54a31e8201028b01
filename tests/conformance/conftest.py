"""One real `idemproxy run` per test module and parser, in front of a raw recording upstream.

Every module runs twice: with aiohttp's C (llhttp) parser and with the pure-Python parser
(`AIOHTTP_NO_EXTENSIONS=1`), because a missing wheel silently falls back to the latter. A module
may set `LIMITS` / `UPSTREAM` (dicts merged into the config) to get short deadlines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.raw_upstream import RawUpstream
from tests.support.secrets import assert_no_secrets

PARSERS = {"llhttp": {"AIOHTTP_NO_EXTENSIONS": ""}, "python": {"AIOHTTP_NO_EXTENSIONS": "1"}}


@dataclass
class Stack:
    parser: str
    proxy: ProxyProcess
    upstream: RawUpstream

    @property
    def port(self) -> int:
        return self.proxy.port


@pytest.fixture(scope="module", params=list(PARSERS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    upstream = RawUpstream().start()
    config = base_config(upstream.url)
    config["upstreams"]["app"].update(getattr(request.module, "UPSTREAM", {}))
    config["limits"] = getattr(request.module, "LIMITS", {})
    workdir = tmp_path_factory.mktemp(f"proxy-{request.param}")
    proxy = ProxyProcess(workdir, config, PARSERS[request.param]).start()
    try:
        yield Stack(request.param, proxy, upstream)
    finally:
        proxy.stop()
        upstream.stop()
    # Every error path the module drove must have kept secrets out of the proxy's output.
    assert_no_secrets(proxy.stdout() + proxy.stderr())
