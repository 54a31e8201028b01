import asyncio
import gzip

import orjson
import pytest
from aiohttp import web
from yarl import URL

from tests.support.ports import free_port
from tests.support.proxy_process import base_config
from tests.support.raw_http import exchange, status_of
from tests.support.upstream import RecordingUpstream

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_is_forwarded_with_its_body(proxy, upstream: RecordingUpstream, method: str) -> None:
    response = await proxy.request(method, "/things", data=b"payload-" + method.encode())
    assert response.status == 200
    echoed = await response.json()
    assert echoed["method"] == method
    assert echoed["body"] == "payload-" + method
    assert upstream.received[0].header("Content-Length") == str(len("payload-" + method))


async def test_head_relays_length_without_a_body(proxy, upstream: RecordingUpstream) -> None:
    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 1234)

    upstream.respond = sized
    response = await proxy.head("/file")
    assert response.status == 200
    assert response.headers["Content-Length"] == "1234"
    assert await response.read() == b""


async def test_normal_path_and_exact_query_reach_the_upstream(proxy, upstream: RecordingUpstream) -> None:
    # The path in its normal form (docs/security/paths.md), the query byte for byte.
    query = "?x=%2F&y=a+b&z&x=2&q=%E2%82%AC;p=1"
    response = await proxy.get(URL("/a%20b/c/%7Euser/%e2%82%ac" + query, encoded=True))
    assert response.status == 200
    assert upstream.received[0].raw_path == "/a%20b/c/~user/%E2%82%AC" + query


async def test_absolute_form_target_cannot_redirect_traffic(proxy, upstream: RecordingUpstream) -> None:
    raw = b"GET http://evil.example/steal?x=1 HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"
    response, _ = await exchange(proxy.port, raw)
    assert status_of(response) == 200
    assert upstream.received[0].raw_path == "/steal?x=1"
    # It reached the route's upstream; Host is the client's (upstreams.*.host: preserve).
    assert upstream.received[0].header("Host") == "evil.example"


async def test_status_reason_and_repeated_headers_are_relayed(proxy, upstream: RecordingUpstream) -> None:
    async def teapot(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=418, reason="Short And Stout", text="tea")
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers["X-App"] = "yes"
        return response

    upstream.respond = teapot
    response = await proxy.get("/")
    assert (response.status, response.reason) == (418, "Short And Stout")
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["X-App"] == "yes"
    assert response.headers["Via"] == "1.1 idemproxy"
    assert await response.text() == "tea"


async def test_hop_by_hop_request_headers_are_removed(proxy, upstream: RecordingUpstream) -> None:
    raw = (
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nProxy-Connection: keep-alive\r\nX-Kept: k\r\n\r\n"
    )
    response, _ = await exchange(proxy.port, raw)
    assert status_of(response) == 200
    got = {k.lower() for k, _ in upstream.received[0].headers}
    assert not got & {"x-secret", "keep-alive", "proxy-authorization", "te", "upgrade", "proxy-connection"}
    assert upstream.received[0].header("X-Kept") == "k"


async def test_hop_by_hop_response_headers_are_removed(proxy, upstream: RecordingUpstream) -> None:
    async def leaky(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="ok",
            headers={"Connection": "X-Internal", "X-Internal": "secret", "Keep-Alive": "timeout=1",
                     "Proxy-Authenticate": "Basic", "Trailer": "X-T", "X-Public": "p"},
        )

    upstream.respond = leaky
    response = await proxy.get("/")
    assert response.headers["X-Public"] == "p"
    for name in ("X-Internal", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
        assert name not in response.headers


async def test_forwarding_headers_are_set_and_client_values_replaced(proxy, upstream: RecordingUpstream) -> None:
    await proxy.get("/", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
                                  "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"})
    seen = upstream.received[0]
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{proxy.port}"
    assert seen.header("Forwarded") is None and seen.header("X-Real-IP") is None
    assert seen.header("Via") == "1.1 idemproxy"


async def test_trusted_proxy_forwarding_headers_are_extended(make_proxy, upstream: RecordingUpstream) -> None:
    client = await make_proxy(base_config(upstream.url, trusted_proxies=["127.0.0.0/8"]))
    await client.get("/", headers={"X-Forwarded-For": "203.0.113.4", "X-Forwarded-Proto": "https"})
    seen = upstream.received[0]
    assert seen.header("X-Forwarded-For") == "203.0.113.4, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"


async def test_configured_forwarding_headers_are_stripped_from_untrusted_clients(
    make_proxy, upstream: RecordingUpstream
) -> None:
    config = base_config(upstream.url, forwarding={"strip_headers": ["X-Tenant-Verified"]})
    client = await make_proxy(config)
    await client.get("/", headers={"X-Tenant-Verified": "yes", "X-Original-URL": "/admin",
                                   "True-Client-IP": "6.6.6.6", "X-Kept": "1"})
    seen = upstream.received[0]
    assert [seen.header(n) for n in ("X-Tenant-Verified", "X-Original-URL", "True-Client-IP")] == [
        None, None, None
    ]
    assert seen.header("X-Kept") == "1"


async def test_redirects_are_relayed_not_followed(proxy, upstream: RecordingUpstream) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/elsewhere")

    upstream.respond = redirect
    response = await proxy.get("/start", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/elsewhere"
    assert upstream.count == 1


async def test_compressed_bodies_are_relayed_as_bytes(proxy, upstream: RecordingUpstream) -> None:
    packed = gzip.compress(b"a" * 100_000)

    async def zipped(request: web.Request) -> web.StreamResponse:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip"})

    upstream.respond = zipped
    response = await proxy.get("/", headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == packed


async def test_gzip_request_body_is_not_inflated(proxy, upstream: RecordingUpstream) -> None:
    packed = gzip.compress(b"b" * 50_000)
    await proxy.post("/", data=packed, headers={"Content-Encoding": "gzip"})
    assert upstream.received[0].body == packed


async def test_chunked_request_body_is_streamed(proxy, upstream: RecordingUpstream) -> None:
    async def parts():
        for i in range(5):
            yield b"part%d;" % i

    response = await proxy.post("/", data=parts())
    assert response.status == 200
    assert upstream.received[0].body == b"part0;part1;part2;part3;part4;"
    assert upstream.received[0].header("Transfer-Encoding") == "chunked"


async def test_chunked_response_is_streamed(proxy, upstream: RecordingUpstream) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(3):
            await response.write(b"chunk%d" % i)
        await response.write_eof()
        return response

    upstream.respond = chunked
    response = await proxy.get("/")
    assert await response.read() == b"chunk0chunk1chunk2"


async def test_no_route_is_a_404_problem(make_proxy, upstream: RecordingUpstream) -> None:
    routes = [{"name": "api", "match": {"path_prefix": "/api", "methods": ["GET"]}, "upstream": "app"}]
    client = await make_proxy(base_config(upstream.url, routes=routes))
    for method, path in (("GET", "/other"), ("POST", "/api"), ("GET", "/apiary")):
        response = await client.request(method, path)
        assert response.status == 404
        assert response.content_type == "application/problem+json"
        problem = orjson.loads(await response.read())
        assert problem["type"] == "urn:idemproxy:problem:no-route"
        assert problem["trace_id"] == response.headers["X-Trace-Id"]
    assert (await client.get("/api/x")).status == 200
    assert upstream.count == 1


async def test_refused_upstream_is_a_502_problem(make_proxy) -> None:
    client = await make_proxy(base_config(f"http://127.0.0.1:{free_port()}"))
    response = await client.post("/pay", data=b"{}")
    assert response.status == 502
    problem = orjson.loads(await response.read())
    assert (problem["status"], problem["type"]) == (502, "urn:idemproxy:problem:upstream-unreachable")
    assert problem["trace_id"] == response.headers["X-Trace-Id"]


async def test_slow_upstream_is_a_504_problem(make_proxy, upstream: RecordingUpstream) -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response()

    upstream.respond = stuck
    config = base_config(upstream.url)
    config["upstreams"]["app"]["timeout"] = "300ms"
    client = await make_proxy(config)
    response = await client.get("/")
    release.set()
    assert response.status == 504
    problem = orjson.loads(await response.read())
    assert problem["type"] == "urn:idemproxy:problem:upstream-timeout"


async def test_declared_body_over_the_limit_is_413_before_the_upstream(make_proxy, upstream) -> None:
    client = await make_proxy(base_config(upstream.url, limits={"max_request_body": "1KiB"}))
    response = await client.post("/", data=b"x" * 1025)
    assert response.status == 413
    assert orjson.loads(await response.read())["type"] == "urn:idemproxy:problem:body-too-large"
    assert upstream.count == 0
    assert (await client.post("/", data=b"x" * 1024)).status == 200


async def test_streamed_body_over_the_limit_is_413(make_proxy, upstream) -> None:
    client = await make_proxy(base_config(upstream.url, limits={"max_request_body": "1KiB"}))

    async def parts():
        for _ in range(4):
            yield b"y" * 512

    response = await client.post("/", data=parts())
    assert response.status == 413
    assert all(len(r.body) <= 1024 for r in upstream.received)


async def test_headers_over_the_limit_are_431(make_proxy, upstream) -> None:
    client = await make_proxy(base_config(upstream.url, limits={"max_header_bytes": "2KiB"}))
    many = {f"X-H{i}": "v" * 100 for i in range(30)}
    response = await client.get("/", headers=many)
    assert response.status == 431
    assert orjson.loads(await response.read())["type"] == "urn:idemproxy:problem:headers-too-large"
    one_long = await client.get("/", headers={"X-Long": "v" * 3000})
    assert one_long.status == 431
    assert one_long.headers["X-Trace-Id"]
    assert upstream.count == 0


async def test_slow_body_is_cut_at_the_body_deadline(make_proxy, upstream) -> None:
    client = await make_proxy(base_config(upstream.url, limits={"body_timeout": "300ms"}))
    raw = b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-part"
    response, closed = await exchange(client.port, raw, timeout=3, until_close=True)
    assert status_of(response) == 408
    assert closed
    assert b"urn:idemproxy:problem:body-timeout" in response


async def test_upstream_base_path_is_prepended(make_proxy, upstream: RecordingUpstream) -> None:
    client = await make_proxy(base_config(upstream.url + "/base"))
    await client.get("/x/y?z=1")
    assert upstream.received[0].raw_path == "/base/x/y?z=1"


async def test_expect_continue_is_answered_by_the_proxy(proxy, upstream: RecordingUpstream) -> None:
    head = b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head)
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200 ")
    assert upstream.received[0].body == b"hello"
    assert upstream.received[0].header("Expect") is None
