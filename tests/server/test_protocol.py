"""Properties of the data-port server (proxy/server/protocol.py) against a real `idemproxy run`,
with exact bytes on raw sockets: pipelining and its framing, Expect: 100-continue, HTTP/1.0
and `Connection: close`, upgrade requests and CONNECT. Each property is checked over a class
of inputs (generated pipelines, several refusals at several positions), not one example."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.raw_upstream import RawRequest, RawUpstream
from tests.support.strict_http import Answer, StrictReader, chunk, closed_within, connect, dechunk

MAX_BODY = 1024 * 1024
STATUSES = (200, 201, 202, 204, 404, 409)
BODY_SIZES = (0, 1, 100, 5000, 70000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, RawUpstream]]:
    upstream = RawUpstream().start()
    config = base_config(upstream.url, limits={"max_request_body": "1MiB"})
    config["routes"] = [
        {"name": "k", "match": {"path_prefix": "/k", "methods": ["POST"]}, "upstream": "app",
         "idempotency": {"enabled": True}},
        {"name": "x", "match": {"path_prefix": "/x"}, "upstream": "app"},
    ]
    proxy = ProxyProcess(Path(tmp_path_factory.mktemp("protocol")), config).start()
    try:
        yield proxy, upstream
    finally:
        proxy.stop()
        upstream.stop()


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n%s\r\n" % (path.encode(), extra)


def upstream_body(request: RawRequest) -> bytes:
    chunked = (request.header("Transfer-Encoding") or "").lower() == "chunked"
    return dechunk(request.body) if chunked else request.body


def scripted_answer(rng: random.Random, status: int, body: bytes) -> bytes:
    """An upstream response framed by length or (when it may have a body) by chunks."""
    head = b"HTTP/1.1 %d X\r\nX-Seq: %d\r\n" % (status, len(body))
    if status == 204:
        return head + b"\r\n"
    if rng.random() < 0.5:
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(body, rng)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def generated_pipeline(
    upstream: RawUpstream, seed: int, count: int
) -> tuple[bytes, list[tuple[str, bytes]], list[tuple[int, bytes]]]:
    """`count` requests (GET, POST by length, POST chunked) as one byte string; what the
    upstream must receive (target, body) and what the client must get (status, body)."""
    rng = random.Random(seed)
    wire, sent, answers = [], [], []
    for index in range(count):
        path = f"/x/pipe/{seed}/{index}"
        body = rng.randbytes(rng.choice(BODY_SIZES))
        kind = rng.choice(("GET", "POST", "CHUNKED"))
        if kind == "GET":
            body = b""
            wire.append(get(path))
        elif kind == "POST":
            wire.append(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                        % (path.encode(), len(body), body))
        else:
            wire.append(b"POST %s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n%s"
                        % (path.encode(), chunk(body, rng)))
        status = rng.choice(STATUSES)
        reply = b"" if status == 204 else rng.randbytes(rng.choice(BODY_SIZES))
        upstream.scripts[path] = scripted_answer(rng, status, reply)
        sent.append((path, body))
        answers.append((status, reply))
    return b"".join(wire), sent, answers


def assert_answers(answers: list[Answer], expected: list[tuple[int, bytes]]) -> None:
    assert [(a.status, a.body) for a in answers] == expected
    for answer in answers:
        framing = (answer.header("content-length"), answer.header("transfer-encoding"))
        if answer.status == 204:
            assert framing == (None, None)
        else:
            assert (framing[0] is None) != (framing[1] is None), answer.headers
        assert answer.header("x-seq") == str(len(answer.body))


@pytest.mark.parametrize("seed", range(4))
def test_a_generated_pipeline_is_answered_in_order_exactly_framed(
    stack: tuple[ProxyProcess, RawUpstream], seed: int
) -> None:
    proxy, upstream = stack
    wire, sent, expected = generated_pipeline(upstream, seed, 40)
    before = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        sock.sendall(wire + get("/x/last", b"Connection: close\r\n"))
        answers = reader.read(len(expected) + 1)
        reader.read_to_eof()  # nothing after the answer to the request that asked to close
    assert_answers(answers[:-1], expected)
    assert answers[-1].header("connection") == "close"
    received = upstream.requests[before:]
    assert [(r.target, upstream_body(r)) for r in received] == [*sent, ("/x/last", b"")]


BAD_HEADS = {
    "obs-fold": b"GET /x/bad HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "bare-lf": b"GET /x/bad HTTP/1.1\nHost: a\n\n",
    "no-host": b"GET /x/bad HTTP/1.1\r\n\r\n",
    "two-lengths": b"POST /x/bad HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nz",
    "long-line": b"GET /x/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    "space-before-colon": b"GET /x/bad HTTP/1.1\r\nHost : a\r\n\r\n",
    "bad-version": b"GET /x/bad HTTP/1.2\r\nHost: a\r\n\r\n",
    # No tunnel is opened (CONNECT: what follows is never read), and an upgrade request's
    # chunked body cannot be framed (llhttp leaves it unparsed).
    "connect": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    "connect-ip": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\nSSH-2.0-x\r\n",
    "connect-with-tunnel-bytes": b"CONNECT a:80 HTTP/1.1\r\nHost: a:80\r\n\r\n" + get("/x/tunnelled"),
    "upgrade-chunked": b"POST /x/up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                       b"Upgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("before", [0, 1, 5])
@pytest.mark.parametrize("bad", sorted(BAD_HEADS))
def test_a_refused_head_is_answered_in_turn_and_nothing_after_it_is_forwarded(
    stack: tuple[ProxyProcess, RawUpstream], bad: str, before: int
) -> None:
    proxy, upstream = stack
    wire, sent, expected = generated_pipeline(upstream, 100 + before, before)
    after = b"".join(get(f"/x/after/{i}") for i in range(3))
    count = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        sock.sendall(wire + BAD_HEADS[bad] + after)
        answers = reader.read(before + 1)
        reader.read_to_eof()
    assert_answers(answers[:before], expected)
    refusal = answers[before]
    assert 400 <= refusal.status < 500
    assert refusal.header("connection") == "close"
    assert refusal.header("content-type") == "application/problem+json"
    assert [(r.target, upstream_body(r)) for r in upstream.requests[count:]] == sent


# --- Expect: 100-continue ------------------------------------------------------------------

REFUSED_BEFORE_THE_BODY = {
    # 413 from the declared length alone, 404 from the route: no 100, the final answer at once.
    "too-large": (b"POST /x/e HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n" % (MAX_BODY + 1), 413),
    "no-route": (b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n", 404),
    "no-route-chunked": (b"PUT /nowhere HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n", 404),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BEFORE_THE_BODY))
def test_a_request_refused_before_its_body_gets_no_100(
    stack: tuple[ProxyProcess, RawUpstream], case: str
) -> None:
    proxy, upstream = stack
    head, status = REFUSED_BEFORE_THE_BODY[case]
    count = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        sock.sendall(head + b"Expect: 100-continue\r\n\r\n")
        [answer] = reader.read(1)
        assert answer.status == status
        assert answer.header("connection") == "close"  # its body is unread: it cannot go on
        assert closed_within(sock, 3) is not None
    assert upstream.count == count


EXPECTING = {
    "small": (b"Content-Length: 5\r\n", b"hello", b"hello"),
    "over-the-high-water": (b"Content-Length: 300000\r\n", bytes(300000), bytes(300000)),
    "chunked": (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n",
                b"helloabc"),
    "expect-case": (b"Content-Length: 2\r\nExpect: 100-CONTINUE\r\n", b"hi", b"hi"),
}


@pytest.mark.parametrize("case", sorted(EXPECTING))
def test_the_100_comes_when_the_body_is_read_and_the_body_arrives_intact(
    stack: tuple[ProxyProcess, RawUpstream], case: str
) -> None:
    proxy, upstream = stack
    framing, body, forwarded = EXPECTING[case]
    expect = b"" if b"Expect" in framing else b"Expect: 100-continue\r\n"
    count = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        sock.sendall(b"POST /x/e HTTP/1.1\r\nHost: a\r\n" + framing + expect + b"\r\n")
        [interim] = reader.read(1)
        assert interim.status == 100
        sock.sendall(body + get("/x/next"))
        _, final, following = reader.read(3)
    assert (final.status, following.status) == (200, 200)
    [request, then] = upstream.requests[count:]
    assert upstream_body(request) == forwarded
    assert request.header("Expect") is None
    assert then.target == "/x/next"


# Around the 256 KiB past which the server stops reading while a body waits for its reader.
KEYED_BODY_SIZES = (1000, 200_000, 262_144, 262_145, 300_000, 700_000)


@pytest.mark.parametrize("size", KEYED_BODY_SIZES)
@pytest.mark.parametrize("delivery", ["with-the-head", "after-the-head"])
def test_a_keyed_body_of_any_size_leaves_the_connection_serving(
    stack: tuple[ProxyProcess, RawUpstream], size: int, delivery: str
) -> None:
    """The idempotency stage reads a keyed body whole; however much of it waited for that
    (over the high-water mark, the server paused reading), the connection reads the next
    request afterwards: the first execution, its replay and a request behind them."""
    proxy, upstream = stack
    body = random.Random(size).randbytes(size)
    head = b"POST /k/%d/%s HTTP/1.1\r\nHost: a\r\nIdempotency-Key: %d-%s\r\n" \
        b"Content-Length: %d\r\n\r\n" % (size, delivery.encode(), size, delivery.encode(), size)
    count = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        for sent in (1, 2):  # the first execution, then its replay
            if delivery == "with-the-head":
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
            reader.read(sent)
        sock.sendall(get("/x/after-keyed"))
        first, replay, following = reader.read(3)
    assert (first.status, replay.status, following.status) == (200, 200, 200)
    assert replay.header("idempotent-replayed") == "true"
    assert replay.body == first.body
    [executed, then] = upstream.requests[count:]
    assert upstream_body(executed) == body
    assert then.target == "/x/after-keyed"


def test_no_100_for_a_body_less_request_or_an_http10_client(
    stack: tuple[ProxyProcess, RawUpstream],
) -> None:
    """RFC 9110 §10.1.1: a server MUST ignore 100-continue from an HTTP/1.0 client."""
    proxy, upstream = stack
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        sock.sendall(b"POST /x/e HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert [a.status for a in reader.read(1)] == [200]
        sock.sendall(b"POST /x/e HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi")
        assert [a.status for a in reader.read(2)] == [200, 200]
    assert upstream_body(upstream.requests[-1]) == b"hi"


# --- HTTP/1.0 and Connection: close ---------------------------------------------------------

KEEP_ALIVE = {
    b"GET /x/k HTTP/1.0\r\n\r\n": False,
    b"GET /x/k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n": True,
    b"GET /x/k HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n": True,
    b"GET /x/k HTTP/1.0\r\nHost: a\r\nConnection: close\r\n\r\n": False,
    b"GET /x/k HTTP/1.1\r\nHost: a\r\n\r\n": True,
    b"GET /x/k HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n": False,
    b"GET /x/k HTTP/1.1\r\nHost: a\r\nConnection: CLOSE\r\n\r\n": False,
    b"POST /x/k HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\n\r\nab": False,
}


@pytest.mark.parametrize("request_bytes", list(KEEP_ALIVE), ids=range(len(KEEP_ALIVE)))
def test_keep_alive_only_when_the_version_or_the_client_asks(
    stack: tuple[ProxyProcess, RawUpstream], request_bytes: bytes
) -> None:
    proxy, upstream = stack
    kept = KEEP_ALIVE[request_bytes]
    count = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        # A second request in the same send: answered only on a kept-alive connection.
        sock.sendall(request_bytes + get("/x/second"))
        [first] = reader.read(1)
        assert first.status == 200
        http10 = b"HTTP/1.0" in request_bytes.split(b"\r\n")[0]
        assert first.header("connection") == ("close" if not kept else
                                              "keep-alive" if http10 else None)
        if kept:
            assert reader.read(2)[1].status == 200
        else:
            reader.read_to_eof()
    assert [r.target for r in upstream.requests[count:]] == (
        ["/x/k", "/x/second"] if kept else ["/x/k"])


async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream answer without a length: its end is the end of the connection."""
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 100000)
    await writer.drain()


@pytest.mark.parametrize("upstream_framing", ["chunked", "eof"])
@pytest.mark.parametrize("version", ["1.0", "1.0-keep-alive", "1.1"])
def test_a_response_without_length_is_close_delimited_for_http10(
    stack: tuple[ProxyProcess, RawUpstream], version: str, upstream_framing: str
) -> None:
    proxy, upstream = stack
    body = b"z" * 100000
    path = f"/x/nolength/{upstream_framing}"
    upstream.scripts[path] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(body, random.Random(1))
        if upstream_framing == "chunked" else close_delimited
    )
    line = b"GET %s HTTP/%s\r\nHost: a\r\n" % (path.encode(), version[:3].encode())
    ask = b"Connection: keep-alive\r\n" if version.endswith("keep-alive") else b""
    with connect(proxy.port) as sock:
        sock.sendall(line + ask + b"\r\n")
        if version == "1.1":
            reader = StrictReader(sock)
            [answer] = reader.read(1)
            assert answer.header("transfer-encoding") == "chunked"
            assert answer.body == body
            return
        raw = b""
        while chunk_ := sock.recv(65536):
            raw += chunk_
    head, _, received = raw.partition(b"\r\n\r\n")
    names = [line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:]]
    assert b"content-length" not in names and b"transfer-encoding" not in names
    assert b"connection: close" in head.lower()
    assert received == body


# --- upgrade requests and CONNECT -----------------------------------------------------------

UPGRADE_BODIES = {
    "none": b"",
    "small": b"hello",
    "over-the-high-water": bytes(300000),
    "a-request": get("/x/smuggled"),  # a body, never a second request
}


@pytest.mark.parametrize("split", [False, True], ids=["one-send", "split"])
@pytest.mark.parametrize("token", [b"websocket", b"h2c"])
@pytest.mark.parametrize("body", sorted(UPGRADE_BODIES))
def test_an_upgrade_request_is_served_as_a_plain_request_and_the_connection_goes_on(
    stack: tuple[ProxyProcess, RawUpstream], body: str, token: bytes, split: bool
) -> None:
    proxy, upstream = stack
    payload = UPGRADE_BODIES[body]
    length = b"Content-Length: %d\r\n" % len(payload) if payload else b""
    wire = (b"POST /x/up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: %s\r\n%s\r\n%s"
            % (token, length, payload)) + get("/x/after")
    count = upstream.count
    with connect(proxy.port) as sock:
        reader = StrictReader(sock)
        if split:  # cut inside the body (or the next head): the rest comes in a later read
            cut = len(wire) - len(payload) // 2 - 20
            sock.sendall(wire[:cut])
            reader.read(0)
            sock.sendall(wire[cut:])
        else:
            sock.sendall(wire)
        assert [a.status for a in reader.read(2)] == [200, 200]
        sock.sendall(get("/x/third"))
        assert reader.read(3)[2].status == 200
    upgraded, after, third = upstream.requests[count:]
    assert upstream_body(upgraded) == payload
    assert (upgraded.header("Upgrade"), upgraded.header("Connection")) == (None, None)
    assert (after.target, third.target) == ("/x/after", "/x/third")
