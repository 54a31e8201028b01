"""200 MiB each way through a real `idemproxy run` process, with the proxy's peak memory flat."""

import hashlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

SIZE = 200 * 1024 * 1024
CHUNK = 256 * 1024
BLOCK = bytes(range(256)) * (CHUNK // 256)
# Generous: the interpreter with aiohttp, uvloop and pydantic loaded is ~50 MiB.
MAX_PEAK_RSS = 150 * 1024 * 1024


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
async def test_large_bodies_stream_both_ways_with_bounded_memory(
    upstream: RecordingUpstream, proxy_process
) -> None:
    uploaded = hashlib.sha256()
    uploaded_size = 0

    async def sink_or_source(request: web.Request) -> web.StreamResponse:
        nonlocal uploaded_size
        if request.method == "POST":
            async for chunk in request.content.iter_chunked(CHUNK):
                uploaded.update(chunk)
                uploaded_size += len(chunk)
            return web.json_response({"size": uploaded_size})
        response = web.StreamResponse()
        response.content_length = SIZE
        await response.prepare(request)
        for _ in range(SIZE // CHUNK):
            await response.write(BLOCK)
        await response.write_eof()
        return response

    upstream.respond = sink_or_source
    config = base_config(upstream.url, limits={"max_request_body": "1GiB"})
    config["upstreams"]["app"]["timeout"] = "120s"
    proxy = proxy_process(config)

    async def body():
        for _ in range(SIZE // CHUNK):
            yield BLOCK

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        async with session.post(proxy.url + "/upload", data=body()) as response:
            assert response.status == 200
            assert (await response.json())["size"] == SIZE
        sent = hashlib.sha256()
        for _ in range(SIZE // CHUNK):
            sent.update(BLOCK)
        assert uploaded.hexdigest() == sent.hexdigest()

        received = hashlib.sha256()
        received_size = 0
        async with session.get(proxy.url + "/download") as response:
            assert response.headers["Content-Length"] == str(SIZE)
            async for chunk in response.content.iter_chunked(CHUNK):
                received.update(chunk)
                received_size += len(chunk)
        assert (received_size, received.hexdigest()) == (SIZE, sent.hexdigest())

    assert proxy.process is not None
    peak = peak_rss(proxy.process.pid)
    print(f"proxy peak RSS {peak / 2**20:.1f} MiB")
    assert peak < MAX_PEAK_RSS
