"""Fingerprinting keyed JSON bodies in a real `idemproxy run` (memory store): peak memory stays a
small multiple of the body whatever its shape, and too-deep JSON is a 400 problem, never a 500."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.idempotency import assert_problem, idem_config
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import RecordingUpstream

MAX_BODY = 10 * 1024 * 1024
JSON = {"Content-Type": "application/json"}


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> int:
    """Start a new VmHWM measurement (Linux: clear_refs 5); return the RSS it starts from."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid, "VmRSS")


def many_empty_objects() -> bytes:
    return b"[" + b",".join([b"{}"] * ((MAX_BODY - 2) // 3)) + b"]"


def one_flat_object() -> bytes:
    members = (b'"%x":0' % i for i in range(MAX_BODY // 10))
    return b"{" + b",".join(members) + b"}"


def deep_wrapped_records() -> bytes:
    records = b",".join([b'{"id":1,"n":[1.5,{"a":"b"}],"z":null}'] * (MAX_BODY // 45))
    return b'{"a":' * 100 + b"[" + records + b"]" + b"}" * 100


@pytest.mark.slow
@pytest.mark.parametrize("shape", [many_empty_objects, one_flat_object, deep_wrapped_records])
async def test_keyed_10mib_json_raises_peak_rss_by_less_than_3x_its_size(
    upstream: RecordingUpstream, proxy_process: Callable[..., ProxyProcess],
    shape: Callable[[], bytes],
) -> None:
    body = shape()
    assert len(body) <= MAX_BODY
    proxy = proxy_process(idem_config(upstream.url, "memory://"))
    assert proxy.process is not None
    pid = proxy.process.pid
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Warm up the keyed path (imports, pools, first allocations) before measuring.
        async with session.post(proxy.url + "/v1/pay", data=b"{}",
                                headers={**JSON, "Idempotency-Key": "warm"}) as response:
            assert response.status == 200
        start = reset_peak(pid)
        async with session.post(proxy.url + "/v1/pay", data=body,
                                headers={**JSON, "Idempotency-Key": "big"}) as response:
            assert response.status == 200, await response.text()
        rise = _status(pid, "VmHWM") - start
    print(f"{shape.__name__}: {len(body) / 2**20:.1f} MiB body, peak RSS +{rise / 2**20:.1f} MiB")
    assert rise < 3 * len(body)
    assert upstream.received[-1].body == body  # forwarded byte for byte


async def test_too_deep_json_is_a_400_problem_and_the_proxy_keeps_serving(
    upstream: RecordingUpstream, proxy_process: Callable[..., ProxyProcess],
) -> None:
    proxy = proxy_process(idem_config(upstream.url, "memory://"))  # limits.max_json_depth: 128
    async with aiohttp.ClientSession() as session:
        for depth, opener, closer in ((129, b"[", b"]"), (300, b'{"a":', b"}"),
                                      (100_000, b"[", b"]")):
            deep = opener * depth + b"1" + closer * depth
            async with session.post(proxy.url + "/v1/pay", data=deep,
                                    headers={**JSON, "Idempotency-Key": f"deep-{depth}"}
                                    ) as response:
                body = await assert_problem(response, 400, "json-too-deep")
                assert "128" in body["detail"]
        assert upstream.count == 0  # refused before anything was claimed or forwarded
        # At the limit it is fingerprinted and forwarded; the same key then replays.
        ok = b"[" * 128 + b"1" + b"]" * 128
        for _ in range(2):
            async with session.post(proxy.url + "/v1/pay", data=ok,
                                    headers={**JSON, "Idempotency-Key": "ok"}) as response:
                assert response.status == 200
        assert upstream.count == 1
        # Unkeyed and non-JSON bodies are not fingerprinted, so have no depth limit.
        deep = b"[" * 300 + b"]" * 300
        async with session.post(proxy.url + "/v1/pay", data=deep, headers=JSON) as response:
            assert response.status == 200
        async with session.post(proxy.url + "/v1/pay", data=deep,
                                headers={"Idempotency-Key": "text"}) as response:
            assert response.status == 200
    assert "Traceback" not in proxy.stderr()


@pytest.mark.slow
async def test_other_requests_are_served_while_a_large_body_is_fingerprinted(
    upstream: RecordingUpstream, proxy_process: Callable[..., ProxyProcess],
) -> None:
    """The slowest shape for the canonicaliser (seconds of CPU for 10 MiB) does not stop the
    event loop: it runs in a worker thread."""
    element = b"[" * 7 + b"{}" + b"]" * 7
    body = b"[" + b",".join([element] * (MAX_BODY // (len(element) + 1))) + b"]"
    proxy = proxy_process(idem_config(upstream.url, "memory://"))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def post_big() -> float:
            began = time.monotonic()
            async with session.post(proxy.url + "/v1/pay", data=body,
                                    headers={**JSON, "Idempotency-Key": "big"}) as response:
                assert response.status == 200
            return time.monotonic() - began

        big = asyncio.create_task(post_big())
        latencies = []
        while not big.done():
            began = time.monotonic()
            async with session.get(proxy.url + "/small") as response:
                assert response.status == 200
            latencies.append(time.monotonic() - began)
        duration = await big
    print(f"big request {duration:.2f}s; {len(latencies)} small ones, slowest "
          f"{max(latencies):.3f}s")
    assert len(latencies) >= 5
    assert max(latencies) < duration / 4
