"""One real `idemproxy run` per test module and delivery, in front of a raw recording upstream.

Every module runs twice: with each request sent whole, and sent one byte per segment for its
first `BYTEWISE_PREFIX` bytes (every llhttp callback then sees its input cut at every possible
point: a header name, a value, a chunk size split across reads). A module may set `LIMITS` /
`UPSTREAM` (dicts merged into the config) to get short deadlines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.raw_client import RawConnection
from tests.support.raw_upstream import RawUpstream
from tests.support.secrets import assert_no_secrets

DELIVERIES = ("whole", "bytewise")
BYTEWISE_PREFIX = 64 * 1024


@dataclass
class Stack:
    delivery: str
    proxy: ProxyProcess
    upstream: RawUpstream

    @property
    def port(self) -> int:
        return self.proxy.port


@pytest.fixture(scope="module", params=DELIVERIES)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    upstream = RawUpstream().start()
    config = base_config(upstream.url)
    config["upstreams"]["app"].update(getattr(request.module, "UPSTREAM", {}))
    config["limits"] = getattr(request.module, "LIMITS", {})
    workdir = tmp_path_factory.mktemp(f"proxy-{request.param}")
    proxy = ProxyProcess(workdir, config).start()
    RawConnection.bytewise_prefix = BYTEWISE_PREFIX if request.param == "bytewise" else 0
    try:
        yield Stack(request.param, proxy, upstream)
    finally:
        RawConnection.bytewise_prefix = 0
        proxy.stop()
        upstream.stop()
    # Every error path the module drove must have kept secrets out of the proxy's output.
    assert_no_secrets(proxy.stdout() + proxy.stderr())
