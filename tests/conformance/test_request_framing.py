"""A1 (and A3 request-side) of the bad-input catalogue as exact bytes against the real proxy.

For each case: the status (None = closed without an answer), whether the connection closed, and
what the upstream received: nothing, or the normalised request checked by `upstream`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.conformance.conftest import Stack
from tests.support.raw_client import exchange
from tests.support.raw_upstream import RawRequest
from tests.support.secrets import AUTHORIZATION, QUERY, assert_no_secrets, secret_headers

Check = Callable[[RawRequest], None]


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    status: int
    closed: bool = True
    # None: nothing may reach the upstream. A check: exactly one request arrived and passes it.
    upstream: Check | None = None


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /a HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", body)


def forwarded_body(expected: bytes) -> Check:
    def check(request: RawRequest) -> None:
        assert request.method == "POST"
        assert request.target == "/a"
        assert request.all("Transfer-Encoding") in ([], ["chunked"])
        body = request.body
        if request.header("Transfer-Encoding"):
            body = dechunk(body)
        assert body == expected
        assert request.header("Trailer") is None
        assert request.header("X-Smuggled") is None

    return check


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def routed(target: str, forwarded_host: str | None) -> Check:
    def check(request: RawRequest) -> None:
        assert request.target == target
        # The client's Host is preserved (upstreams.*.host); without one, the upstream's own.
        host = request.header("Host") or ""
        assert host == forwarded_host or (forwarded_host is None and host.startswith("127.0.0.1:"))
        assert request.header("X-Forwarded-Host") == forwarded_host
        assert request.header("X-Forwarded-Proto") == "http"

    return check


def no_hop_by_hop(request: RawRequest) -> None:
    for name in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "TE",
        "Trailer", "Upgrade", "X-Internal",
    ):
        assert request.header(name) is None, name
    assert request.header("X-Kept") == "yes"


def forwarding_replaced(request: RawRequest) -> None:
    assert request.all("X-Forwarded-For") == ["127.0.0.1"]
    assert request.all("X-Forwarded-Proto") == ["http"]
    assert request.all("X-Forwarded-Host") == ["a"]
    assert request.header("Forwarded") is None
    assert request.header("X-Real-IP") is None
    assert request.all("Via") == ["1.1 idemproxy"]


# Read by upstream frameworks as the client's address, scheme, port or original URL.
SPOOFABLE = (
    "X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Scheme", "X-Forwarded-Server",
    "X-Forwarded-Ssl", "True-Client-IP", "X-Client-IP", "CF-Connecting-IP", "X-Original-URL",
    "X-Rewrite-URL", "Fastly-Client-IP", "X-Cluster-Client-IP", "X-Forwarded-Uri",
    "Front-End-Https",
)


def spoofable_removed(request: RawRequest) -> None:
    forwarding_replaced(request)
    for name in SPOOFABLE:
        assert request.header(name) is None, name
    assert request.header("X-Kept") == "yes"


def trace_replaced(request: RawRequest) -> None:
    traceparent = request.header("traceparent") or ""
    assert traceparent.startswith("00-")
    assert "0af7651916cd43dd8448eb211c80319c" not in traceparent
    assert request.header("X-Trace-Id") == traceparent.split("-")[1]


def trace_kept(request: RawRequest) -> None:
    assert request.header("X-Trace-Id") == "0af7651916cd43dd8448eb211c80319c"
    assert request.header("tracestate") == "vendor=1"


def upgrade_stripped(request: RawRequest) -> None:
    assert request.header("Upgrade") is None
    assert request.header("Connection") is None
    assert request.body == SMUGGLED


def secrets_forwarded(request: RawRequest) -> None:
    assert request.header("Authorization") == AUTHORIZATION
    assert request.target == "/a?" + QUERY


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
LONG = b"a" * 9000

CASES = [
    # 1. CL.TE / TE.CL
    Case("cl-te", post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nX"), 400),
    Case("te-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n", b"0\r\n\r\nX"), 400),
    # 2. duplicate Content-Length
    Case("cl-dup-differ", post(b"Content-Length: 1\r\nContent-Length: 2\r\n", b"ab"), 400),
    Case("cl-dup-same", post(b"Content-Length: 2\r\nContent-Length: 2\r\n", b"ab"), 400),
    # 3. malformed Content-Length
    Case("cl-list", post(b"Content-Length: 2, 2\r\n", b"ab"), 400),
    Case("cl-plus", post(b"Content-Length: +2\r\n", b"ab"), 400),
    Case("cl-negative", post(b"Content-Length: -5\r\n", b"ab"), 400),
    Case("cl-unicode-digit", post("Content-Length: \u0662\r\n".encode(), b"ab"), 400),
    Case("cl-underscore", post(b"Content-Length: 1_0\r\n", b"ab"), 400),
    # 4. Transfer-Encoding obfuscation
    Case("te-chunked123", post(b"Transfer-Encoding: chunked123\r\n", b"0\r\n\r\n"), 400),
    Case("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400),
    Case("te-gzip-only", post(b"Transfer-Encoding: gzip\r\n", b"ab"), 400),
    Case(
        "te-two-lines",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n"),
        400,
    ),
    Case("te-tab-before", post(b"Transfer-Encoding:\tchunked\r\n", b"0\r\n\r\n"), 200, False,
         forwarded_body(b"")),
    # 5. list forms of Transfer-Encoding: rejected by the proxy itself
    Case("te-chunked-chunked", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), 400),
    Case("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"2\r\nab\r\n0\r\n\r\n"),
         400),
    Case("te-chunked-gzip", post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"), 400),
    # 6. whitespace and obs-fold
    Case("space-before-colon", post(b"Content-Length : 2\r\n", b"ab"), 400),
    Case("leading-space-line", post(b" Content-Length: 2\r\n", b"ab"), 400),
    Case("obs-fold", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    # 7. bare LF
    Case("bare-lf", b"GET /a HTTP/1.1\nHost: a\n\n", 400),
    # 8. control characters in values
    Case("bare-cr", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    Case("nul", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    Case("ctl-01", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n", 400),
    Case("del", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: b\x7fc\r\n\r\n", 400),
    Case("cr-injection", post(b"X-Abc: \rxTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    # 9. bad chunk sizes and chunk data
    Case("chunk-hex-prefix", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-negative", chunked(b"-1\r\nh\r\n0\r\n\r\n"), 400),
    Case("chunk-trailing-space", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-underscore", chunked(b"0_2e\r\nh\r\n0\r\n\r\n"), 400),
    # A size over 2^64: llhttp refuses it.
    Case("chunk-size-over-2-64", chunked(b"10000000000000001\r\nx\r\n0\r\n\r\n"), 400),
    Case("chunk-ext-lf", chunked(b"5;a\nb\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-too-long", chunked(b"2\r\nhello\r\n0\r\n\r\n"), 400),
    # 10. trailers are consumed, never forwarded
    Case("trailer-dropped", chunked(b"2\r\nab\r\n0\r\nX-Smuggled: 1\r\n\r\n"), 200, False,
         forwarded_body(b"ab")),
    Case("many-trailers",
         chunked(b"2\r\nab\r\n0\r\n" + b"".join(b"X-T%d: 1\r\n" % i for i in range(200))
                 + b"\r\n"),
         431),
    Case("huge-trailer", chunked(b"2\r\nab\r\n0\r\nX-T: " + LONG * 2 + b"\r\n\r\n"), 431),
    # 11. Host
    Case("no-host", b"GET /a HTTP/1.1\r\n\r\n", 400),
    Case("two-hosts", b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    Case("two-hosts-case", b"GET /a HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
    # Host goes upstream as X-Forwarded-Host: only uri-host [":" port] (RFC 9110 §7.2)
    Case("host-with-path", b"GET /a HTTP/1.1\r\nHost: evil.example/x\r\n\r\n", 400),
    Case("host-with-userinfo", b"GET /a HTTP/1.1\r\nHost: user@evil.example\r\n\r\n", 400),
    Case("host-with-space", b"GET /a HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    Case("host-bad-port", b"GET /a HTTP/1.1\r\nHost: a:b\r\n\r\n", 400),
    Case("host-bad-ip-literal", b"GET /a HTTP/1.1\r\nHost: [::g]\r\n\r\n", 400),
    Case("host-ip-literal-port", b"GET /a HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 200, False,
         routed("/a", "[::1]:80")),
    # 12. HTTP/1.0 without Host is served; the upstream Host comes from the upstream URL
    Case("http10-no-host", b"GET /a HTTP/1.0\r\n\r\n", 200, True, routed("/a", None)),
    # versions: llhttp takes HTTP/0.9 and 2.0 request lines (the proxy answers 505), not 1.2
    Case("http09", b"GET /a\r\n\r\n", 505),
    Case("http20", b"GET /a HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    Case("http12", b"GET /a HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    Case("lowercase-method", b"get /a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # 13. line lengths
    Case("long-request-line", b"GET /" + LONG + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    Case("long-header-line", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: " + LONG * 2 + b"\r\n\r\n", 431),
    # 14. too many header fields
    Case("129-headers",
         b"GET /a HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(129))
         + b"\r\n", 431),
    # 15-17. request-target forms: the upstream URL never comes from the target's authority
    Case("absolute-form", b"GET http://evil.example/x?y=1 HTTP/1.1\r\nHost: good.example\r\n\r\n",
         200, False, routed("/x?y=1", "good.example")),
    Case("absolute-form-https", b"GET https://evil.example/x HTTP/1.1\r\nHost: good\r\n\r\n",
         200, False, routed("/x", "good")),
    # a path, never an authority; slashes merged (the normal form, docs/security/paths.md)
    Case("double-slash", b"GET //evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n", 200, False,
         routed("/evil.example/x", "a")),
    # 59. one spelling per path (docs/security/paths.md): refused where servers disagree
    Case("path-semicolon", b"GET /a;jsessionid=1 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("path-encoded-slash", b"GET /a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("path-backslash", b"GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("path-encoded-nul", b"GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("path-dots", b"GET /x/%2e%2E/a?q=/../ HTTP/1.1\r\nHost: a\r\n\r\n", 200, False,
         routed("/a?q=/../", "a")),
    Case("authority-form-get", b"GET evil.example:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("asterisk-get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("asterisk-options", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 400),
    # 18. upgrade with a smuggled request in the body: forwarded as a plain body, no upgrade
    Case("upgrade-smuggle",
         b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
         200, False, upgrade_stripped),
    # 27. hop-by-hop and Connection-listed headers never reach the upstream
    Case("hop-by-hop",
         b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Internal\r\nX-Internal: s\r\n"
         b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
         b"Proxy-Authorization: Basic x\r\n"
         b"TE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n",
         200, False, no_hop_by_hop),
    # 31. forwarding headers from an untrusted client are replaced
    Case("forwarding-spoof",
         b"GET /a HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Proto: https\r\n"
         b"X-Forwarded-Host: evil\r\nForwarded: for=10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\n"
         b"Via: 1.1 evil\r\n\r\n",
         200, False, forwarding_replaced),
    Case("forwarding-spoof-more",
         b"GET /a HTTP/1.1\r\nHost: a\r\n"
         + b"".join(b"%s: 6.6.6.6\r\n" % name.encode() for name in SPOOFABLE)
         + b"X-Kept: yes\r\n\r\n",
         200, False, spoofable_removed),
    # 32. underscores in header names: rejected (Envoy's edge default)
    Case("underscore-name", b"GET /a HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 10.9.9.9\r\n\r\n",
         400),
    # 34. trace context: only a valid traceparent is believed
    Case("traceparent-bad",
         b"GET /a HTTP/1.1\r\nHost: a\r\n"
         b"traceparent: 00-0af7651916cd43dd8448eb211c80319C-b7ad6b7169203331-01\r\n\r\n",
         200, False, trace_replaced),
    Case("traceparent-good",
         b"GET /a HTTP/1.1\r\nHost: a\r\n"
         b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
         b"tracestate: vendor=1\r\n\r\n",
         200, False, trace_kept),
    # secrets pass through to the upstream untouched (and never into the proxy's output)
    Case("secrets", b"GET /a?" + QUERY.encode() + b" HTTP/1.1\r\nHost: a\r\n" + secret_headers()
         + b"\r\n", 200, False, secrets_forwarded),
    Case("secret-in-bad-line", b"GET /a HTTP/1.1\r\nHost: a\r\nAuthorization: "
         + AUTHORIZATION.encode() + b"\x01\r\n\r\n", 400),
    Case("secret-in-long-line",
         b"GET /a?" + QUERY.encode() + LONG + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    Case("secret-in-bad-target",
         b"GET /a?" + QUERY.encode() + b"\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    Case("secrets-rejected", b"GET /a?" + QUERY.encode() + b" HTTP/1.1\r\nHost: a\r\n"
         + secret_headers() + b"X_Bad: 1\r\n\r\n", 400),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_request_case(stack: Stack, case: Case) -> None:
    before = stack.upstream.count
    response, connection = exchange(stack.port, case.raw)
    with connection:
        status = case.status
        assert response is not None, "closed without an answer"
        assert response.status == status, response.body
        assert response.complete
        if status >= 400:
            assert len(response.problem()["trace_id"]) == 32
        assert response.header("Server") == "idemproxy", "aiohttp's version is not advertised"
        # Error details name the fault, never echo the request bytes that carried it.
        assert_no_secrets(response.body.decode("latin-1"))
        if case.closed:
            assert connection.closed_within(3), "connection left open"
        else:
            assert connection.still_serves(), "connection not kept alive"
    received = stack.upstream.requests[before:]
    if case.upstream is None:
        assert received == [], f"reached the upstream: {received[0].raw[:200]!r}"
    else:
        assert len(received) == (1 if case.closed else 2)  # 2: the keep-alive probe
        case.upstream(received[0])

