"""The response head the data server writes: framing is the server's, whatever the stages set."""

from __future__ import annotations

import asyncio

import pytest

from proxy.http.request import HTTP_10, HTTP_11, Request, Version
from proxy.http.response import HeadInjection, Response, StreamResponse


class Wire:
    """A Channel that keeps what is written."""

    def __init__(self) -> None:
        self.data = b""

    @property
    def transport(self) -> asyncio.Transport | None:
        return None

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def abort(self) -> None:
        raise AssertionError("not expected")


def request(method: str = "GET", version: Version = HTTP_11, keep_alive: bool = True
            ) -> tuple[Request, Wire]:
    wire = Wire()
    return Request(method, "/", "", version, ((b"Host", b"a"),), "127.0.0.1", wire, None,
                   keep_alive=keep_alive), wire


def split(data: bytes) -> tuple[str, dict[str, list[str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("utf-8").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        headers.setdefault(name.lower(), []).append(value)
    return status, headers, body


def test_a_whole_response_is_one_head_and_its_body() -> None:
    req, _ = request()
    response = Response(status=201, body=b"hello", content_type="text/plain",
                        headers=[("Content-Length", "999"), ("Transfer-Encoding", "chunked"),
                                 ("Connection", "upgrade")])
    status, headers, body = split(response.encode(req))
    assert status == "HTTP/1.1 201 Created"
    # A stage's (or an upstream's) own framing never reaches the wire.
    assert headers["content-length"] == ["5"]
    assert "transfer-encoding" not in headers and "connection" not in headers
    assert headers["server"] == ["idemproxy"] and len(headers["date"]) == 1
    assert body == b"hello"


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_bodiless_answers_send_no_body(method: str, status: int) -> None:
    req, _ = request(method)
    _, headers, body = split(Response(status=status, body=b"never").encode(req))
    assert body == b""
    # HEAD keeps the length the GET would have had; 204 and 304 carry none.
    assert headers.get("content-length") == (["5"] if method == "HEAD" else None)


async def test_a_stream_without_length_is_chunked_on_http11() -> None:
    req, wire = request()
    response = StreamResponse(status=200)
    await response.prepare(req)
    assert wire.data == b""  # the head waits for the first body bytes
    await response.write(b"abc")
    await response.write(b"")
    await response.write_eof(b"de")
    _, headers, body = split(wire.data)
    assert headers["transfer-encoding"] == ["chunked"]
    assert body == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert response.keep_alive


async def test_a_stream_without_length_ends_with_the_connection_on_http10() -> None:
    req, wire = request(version=HTTP_10)
    response = StreamResponse(status=200)
    await response.prepare(req)
    await response.write_eof(b"abc")
    _, headers, body = split(wire.data)
    assert headers["connection"] == ["close"] and "transfer-encoding" not in headers
    assert body == b"abc" and not response.keep_alive


@pytest.mark.parametrize(
    ("version", "keep_alive", "expected"),
    [(HTTP_11, True, None), (HTTP_11, False, ["close"]), (HTTP_10, True, ["keep-alive"]),
     (HTTP_10, False, ["close"])],
)
def test_connection_header_follows_the_request_and_the_response(
    version: Version, keep_alive: bool, expected: list[str] | None
) -> None:
    req, _ = request(version=version, keep_alive=keep_alive)
    _, headers, _ = split(Response(body=b"x").encode(req))
    assert headers.get("connection") == expected


def test_force_close_says_so() -> None:
    req, _ = request()
    response = Response(body=b"x")
    response.force_close()
    assert split(response.encode(req))[1]["connection"] == ["close"]


def test_header_text_latin1_cannot_hold_goes_as_utf8() -> None:
    """An upstream's obs-text (decoded as latin-1) goes back byte for byte; a config value
    (a route name in a quota header) that latin-1 cannot hold is written as UTF-8."""
    req, _ = request()
    response = Response(headers=[("X-Upstream", "caf\xe9"), ("RateLimit-Policy", "zahlung-€")])
    data = response.encode(req)
    assert b"X-Upstream: caf\xe9\r\n" in data
    assert "RateLimit-Policy: zahlung-€\r\n".encode() in data


@pytest.mark.parametrize("text", ["a\r\nSet-Cookie: evil=1", "a\nb", "a\rb"])
def test_a_line_break_in_head_text_is_never_written(text: str) -> None:
    """Response splitting: a value (a config string in a quota header, say) with CR or LF is
    refused, so the server resets the connection instead of writing a second header or head."""
    req, _ = request()
    with pytest.raises(HeadInjection):
        Response(headers=[("RateLimit-Policy", text)]).encode(req)
    with pytest.raises(HeadInjection):
        Response(reason=text).encode(req)
