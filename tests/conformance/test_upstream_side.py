"""A3 response side: malformed, smuggling-shaped or endless upstream answers never reach the
client as a broken response; before any header went out they become 502/504 problem+json."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conformance.conftest import Stack
from tests.support.ports import wait_until
from tests.support.raw_client import RawConnection, RawResponse, exchange
from tests.support.raw_upstream import Script, stall_after

UPSTREAM = {"timeout": "500ms"}
TIMEOUT = 0.5


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, answer nothing, close."""


def head(*lines: str, body: bytes = b"") -> bytes:
    return ("HTTP/1.1 200 OK\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode(
        "latin-1"
    ) + body


SCRIPTS: dict[str, Script] = {
    "/te-cl": head("Transfer-Encoding: chunked", "Content-Length: 5",
                   body=b"5\r\nhello\r\n0\r\n\r\n"),
    "/ctl-value": head("X-A: b\x01c", "Content-Length: 2", body=b"ok"),
    "/cr-injection": head("X-A: b\rSet-Cookie: evil=1", "Content-Length: 2", body=b"ok"),
    "/nul-value": head("X-A: b\x00c", "Content-Length: 2", body=b"ok"),
    "/bad-chunk-size": head("Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    "/chunk-too-long": head("Transfer-Encoding: chunked", body=b"2\r\nhello\r\n0\r\n\r\n"),
    "/hang-up": hang_up,
    "/head-then-stall": stall_after(head("Content-Length: 10")),
    "/partial-then-stall": stall_after(head("Content-Length: 10", body=b"hello")),
    "/chunk-then-stall": stall_after(head("Transfer-Encoding: chunked", body=b"5\r\nhello\r\n")),
    "/hop-by-hop": head(
        "Connection: X-Secret", "X-Secret: s", "Keep-Alive: timeout=5",
        "Proxy-Authenticate: Basic", "Trailer: X-T", "Upgrade: h2c", "X-Kept: yes",
        "Content-Length: 2", body=b"ok",
    ),
    "/redirect": b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\n"
                 b"Content-Length: 0\r\n\r\n",
    "/obs-fold": head("X-A: b", " c", "Content-Length: 2", body=b"ok"),
    "/bare-lf": b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 2\n\nok",
    "/chunk-size-space": head("Transfer-Encoding: chunked", body=b"5 \r\nhello\r\n0\r\n\r\n"),
    "/cl-short": head(
        "Content-Length: 2", body=b"helloHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    ),
    "/te-chunked-relayed": head("Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
}


@pytest.fixture(autouse=True)
def scripts(stack: Stack) -> None:
    stack.upstream.scripts.update(SCRIPTS)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/te-cl", 502),
        ("/ctl-value", 502),
        ("/cr-injection", 502),
        ("/nul-value", 502),
        ("/bad-chunk-size", 502),
        ("/chunk-too-long", 502),
        ("/hang-up", 502),
        ("/head-then-stall", 504),
    ],
)
def test_bad_upstream_answer_becomes_problem(stack: Stack, path: str, status: int) -> None:
    started = time.monotonic()
    response, connection = exchange(stack.port, get(path))
    with connection:
        assert response is not None
        assert response.status == status
        assert response.complete
        problem = response.problem()
        assert len(problem["trace_id"]) == 32
        assert response.header("Set-Cookie") is None
        assert response.header("X-A") is None
    assert time.monotonic() - started < TIMEOUT + 3


@pytest.mark.parametrize("path", ["/partial-then-stall", "/chunk-then-stall"])
def test_stall_after_first_bytes_cuts_the_client(stack: Stack, path: str) -> None:
    """Headers are out: the proxy cannot change the status, so the client sees a cut, never a
    response that looks complete."""
    started = time.monotonic()
    response, connection = exchange(stack.port, get(path))
    with connection:
        assert response is not None
        assert response.status == 200
        assert response.body == b"hello"
        assert not response.complete
        assert connection.eof
    assert TIMEOUT * 0.9 < time.monotonic() - started < TIMEOUT + 3


def test_hop_by_hop_response_headers_are_stripped(stack: Stack) -> None:
    response, connection = exchange(stack.port, get("/hop-by-hop"))
    with connection:
        assert response is not None
        assert response.status == 200
        for name in ("X-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert response.header(name) is None, name
        assert response.header("Connection") in (None, "keep-alive")
        assert response.header("X-Kept") == "yes"
        assert response.body == b"ok"


def test_redirect_is_relayed_not_followed(stack: Stack) -> None:
    before = stack.upstream.count
    response, connection = exchange(stack.port, get("/redirect"))
    with connection:
        assert response is not None
        assert response.status == 302
        assert response.header("Location") == "http://127.0.0.1:1/elsewhere"
    assert stack.upstream.count == before + 1


def test_upstream_chunked_is_reframed(stack: Stack) -> None:
    response, connection = exchange(stack.port, get("/te-chunked-relayed"))
    with connection:
        assert response is not None
        assert response.status == 200
        assert response.complete
        assert response.body == b"hello"
        assert connection.still_serves()


def test_bad_answers_do_not_poison_the_pool(stack: Stack) -> None:
    """After every failure above, an ordinary request on a fresh client still gets its 200."""
    for path in SCRIPTS:
        exchange(stack.port, get(path), timeout=TIMEOUT + 3)[1].close()
    with RawConnection(stack.port) as connection:
        assert connection.still_serves()



@pytest.mark.parametrize("path", ["/obs-fold", "/bare-lf", "/chunk-size-space"])
def test_lenient_upstream_syntax_is_refused(stack: Stack, path: str) -> None:
    """Obsolete or lenient upstream syntax (obs-fold, bare LF, space after a chunk size) is
    refused by the strict default transport (llhttp, RFC 9112 §5.2 allows 502) with a problem
    answer; it never turns into a malformed downstream message, and the connection serves on."""
    response, connection = exchange(stack.port, get(path))
    with connection:
        assert response is not None
        assert response.status == 502
        response.problem()
        assert connection.still_serves()


def test_extra_bytes_after_the_body_never_answer_another_request(stack: Stack) -> None:
    """Response splitting: bytes beyond Content-Length must not become the next response."""
    response, connection = exchange(stack.port, get("/cl-short"))
    with connection:
        assert response is not None
        if response.status == 502:
            response.problem()
        else:
            assert (response.status, response.body) == (200, b"he")
    for _ in range(3):
        follow_up, connection = exchange(stack.port, get("/after"))
        connection.close()
        assert follow_up is not None
        assert (follow_up.status, follow_up.body) == (200, b"ok")


# --- one response per upstream connection -----------------------------------------------------

SECOND = b"HTTP/1.1 201 Created\r\nSet-Cookie: evil=1\r\nContent-Length: 4\r\n\r\nevil"
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\n"
NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 5\r\n\r\n'
HEAD_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
# framing -> (method, upstream answer without extra bytes, what the client must get exactly:
# status, the headers the upstream sent that are relayed, body)
FRAMINGS: dict[str, tuple[str, bytes, tuple[int, list[tuple[str, str]], bytes]]] = {
    "length": ("GET", LENGTH, (200, [("Content-Length", "2")], b"ok")),
    "chunked": ("GET", CHUNKED, (200, [("Transfer-Encoding", "chunked")], b"ok")),
    "close": ("GET", CLOSE, (200, [("Content-Length", "2")], b"ok")),
    "204": ("GET", NO_CONTENT, (204, [], b"")),
    "304": ("GET", NOT_MODIFIED, (304, [("ETag", '"e"')], b"")),
    "head": ("HEAD", HEAD_LENGTH, (200, [("Content-Length", "5")], b"")),
}
BODILESS = {"204", "304", "head"}
# Headers the proxy adds to every relayed response (values vary: compared by name).
ADDED = {"date", "server", "x-trace-id", "via"}


def violations(stack: Stack) -> dict[str, float]:
    with urllib.request.urlopen(stack.proxy.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "idemproxy_upstream_protocol_violations"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["upstream"] == "app"
    }


def violation_events(stack: Stack) -> list[str]:
    return [
        line["reason"]
        for line in stack.proxy.json_lines()
        if line.get("event") == "upstream_protocol_violation" and line.get("upstream") == "app"
    ]


def relayed(response: RawResponse | None) -> tuple[int, list[tuple[str, str]], bytes]:
    assert response is not None and response.complete
    names = [k.lower() for k, _ in response.headers]
    assert set(names) >= ADDED, names
    kept = [(k, v) for k, v in response.headers if k.lower() not in ADDED | {"connection"}]
    return response.status, kept, response.body


def expected_relay(framing: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """What the proxy relays: the upstream's framing is replaced by its own."""
    status, headers, body = FRAMINGS[framing][2]
    if framing == "chunked":
        headers = [("Transfer-Encoding", "chunked")]
    elif framing in ("204", "304"):
        headers = [h for h in headers if h[0] != "Content-Length"]
    return status, headers, body


def two_clients(stack: Stack, framing: str, path: str) -> None:
    """Client A gets exactly the scripted response, client B (next, same pool) exactly OK."""
    method = FRAMINGS[framing][0]
    with RawConnection(stack.port) as first:
        first.send(f"{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert relayed(first.read_response(head_request=method == "HEAD")) == (
            expected_relay(framing)
        )
        assert first.buffer == b""
    response, second = exchange(stack.port, get("/after"))
    with second:
        assert relayed(response) == (200, [("Content-Type", "text/plain"), ("Content-Length", "2")],
                                     b"ok")
        assert second.buffer == b""


EXTRAS = {
    "second-head": SECOND,
    "continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "crlf": b"\r\n",
    "garbage": b"hello.",
}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_bytes_after_a_response_reach_no_client(stack: Stack, framing: str, extra: str) -> None:
    """Response splitting: whatever follows a response in the same packet is dropped with the
    connection; neither this client nor the next one on the pool sees a byte of it."""
    path = f"/split-{framing}-{extra}"
    stack.upstream.scripts[path] = FRAMINGS[framing][1] + EXTRAS[extra]
    before = violations(stack)
    events = len(violation_events(stack))
    two_clients(stack, framing, path)
    reason = "body_not_allowed" if framing in BODILESS else "extra_bytes"
    after = violations(stack)
    assert after[reason] == before[reason] + 1
    assert sum(after.values()) == sum(before.values()) + 1
    wait_until(lambda: len(violation_events(stack)) > events, 5, "the violation event")
    assert violation_events(stack)[events:] == [reason]


def test_interim_heads_then_a_final_one_are_no_violation(stack: Stack) -> None:
    stack.upstream.scripts["/interims"] = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n"
        b"Set-Cookie: interim=1\r\n\r\n" + LENGTH
    )
    before = violations(stack)
    two_clients(stack, "length", "/interims")
    assert violations(stack) == before


def test_late_bytes_on_an_idle_pooled_connection_reach_no_client(stack: Stack) -> None:
    """Bytes that come after the response, while the connection waits in the pool."""
    late = threading.Event()
    sent = threading.Event()

    async def answer_then_late_bytes(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(LENGTH)
        await writer.drain()
        await asyncio.get_running_loop().run_in_executor(None, late.wait, 5)
        writer.write(SECOND)
        await writer.drain()
        sent.set()
        await reader.read()  # a reused connection would hang here, unanswered

    stack.upstream.scripts["/late"] = answer_then_late_bytes
    before = violations(stack)
    response, first = exchange(stack.port, get("/late"))
    with first:
        assert relayed(response) == (200, [("Content-Length", "2")], b"ok")
    late.set()
    assert sent.wait(5)
    wait_until(lambda: violations(stack)["idle_bytes"] > before["idle_bytes"], 5, "idle_bytes")
    response, second = exchange(stack.port, get("/after"))
    with second:
        assert relayed(response)[2] == b"ok"
        assert response is not None and response.header("Set-Cookie") is None


GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=48),
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"0\r\n\r\n"]), min_size=1)
    .map(b"".join),
    st.sampled_from(list(EXTRAS.values())),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(framing=st.sampled_from(sorted(FRAMINGS)), garbage=GARBAGE)
def test_no_byte_outside_a_response_reaches_any_client(
    stack: Stack, framing: str, garbage: bytes
) -> None:
    """The property: for every framing and any bytes after the response, client A gets exactly
    the response, client B exactly its own, and each case counts one violation."""
    path = f"/property-{framing}"
    stack.upstream.scripts[path] = FRAMINGS[framing][1] + garbage
    before = sum(violations(stack).values())
    two_clients(stack, framing, path)
    assert sum(violations(stack).values()) == before + 1
