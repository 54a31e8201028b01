"""The data plane's responses: a head the stages build, written by the server's channel.

`StreamResponse` streams (`prepare`, `write`, `write_eof`); `Response` carries its whole body and
is written by the server after the handler returns. The head never leaves alone: it waits for
the first body bytes (or the end), so a small response is one write, one syscall.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus

from multidict import CIMultiDict

from proxy.http.headers import SERVER
from proxy.http.request import HTTP_10, Request

# RFC 9112 §6.3: no body, whatever the headers say.
_BODILESS = frozenset({204, 304})
# Framing is the server's: a stage's (or an upstream's) own value would be wrong or unsafe.
_FRAMING = ("Content-Length", "Transfer-Encoding", "Connection")
_LAST_CHUNK = b"0\r\n\r\n"
_SERVER = f"Server: {SERVER}\r\n".encode()

HeaderSource = Mapping[str, str] | Iterable[tuple[str, str]]


class _Date:
    """RFC 9110 §6.6.1 Date, formatted once per second, not once per response."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class HeadInjection(ValueError):
    """A header or reason would end its line early (CR or LF): the head is never written."""


def _wire(text: str) -> bytes:
    """Header text as bytes: upstream heads are decoded as latin-1 and go back byte for byte;
    text from elsewhere (a config value) that latin-1 cannot hold goes as UTF-8. A CR or LF
    (which upstream heads cannot carry: proxy.http.headers.relay_headers) would split
    the response, so it is refused; the server then resets the connection."""
    if "\r" in text or "\n" in text:
        raise HeadInjection(f"CR or LF in response head text {text[:40]!r}")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _fields(status: int, reason: str, headers: CIMultiDict[str]) -> bytes:
    """The status line and the headers' lines. Almost always one str and one encode: a CR or
    LF anywhere would add to the line breaks counted here, and text latin-1 cannot hold fails
    the encode; either sends it to the text-by-text path, which refuses or re-encodes it."""
    lines = [f"HTTP/1.1 {status:d} {reason}", *map(": ".join, headers.items()), ""]
    text = "\r\n".join(lines)
    breaks = len(lines) - 1
    if text.count("\n") == breaks and text.count("\r") == breaks:
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            pass
    fields = [b"HTTP/1.1 %d %s\r\n" % (status, _wire(reason))]
    fields.extend(b"%s: %s\r\n" % (_wire(name), _wire(value)) for name, value in headers.items())
    return b"".join(fields)


def reason_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class StreamResponse:
    """A response head and, once prepared, its body as a stream of writes."""

    def __init__(self, *, status: int = 200, reason: str | None = None,
                 headers: HeaderSource | None = None) -> None:
        self.status = status
        self.reason = reason_for(status) if reason is None else reason
        self.headers: CIMultiDict[str] = CIMultiDict(headers or ())
        self.content_length: int | None = None
        self.keep_alive = True
        self.prepared = False
        self.finished = False
        self._request: Request | None = None
        self._head = b""  # encoded, not yet written: it leaves with the first body bytes
        self._chunked = False
        self._silent = False  # HEAD, 204, 304: the head goes out, the body never does

    def force_close(self) -> None:
        """End the connection after this response (`Connection: close`)."""
        self.keep_alive = False

    async def prepare(self, request: Request) -> None:
        """Fix the head. It is written with the first `write` (or `write_eof`)."""
        if self.prepared:
            return
        self._request = request
        self.prepared = True
        self._head = self._encode_head(request)

    def _encode_head(self, request: Request) -> bytes:
        status = self.status
        headers = self.headers
        for name in _FRAMING:
            if name in headers:
                del headers[name]
        self._silent = request.method == "HEAD" or status in _BODILESS or status < 200
        length = self.content_length
        body = request.content
        if not request.keep_alive or (body is not None and not body.is_eof()):
            # A body still arriving is not read to its end: the server closes after this
            # answer, and says so (a client waiting on 100-continue then sends nothing).
            self.keep_alive = False
        lines = [_fields(status, self.reason, headers)]
        # The framing follows the stages' headers (as aiohttp wrote them).
        if length is not None:
            if status not in _BODILESS and status >= 200:
                lines.append(b"Content-Length: %d\r\n" % length)
        elif not self._silent:
            if request.version == HTTP_10:
                self.keep_alive = False  # HTTP/1.0 has no chunked coding: the close ends it
            else:
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif request.version == HTTP_10:
            lines.append(b"Connection: keep-alive\r\n")
        if "Date" not in headers:
            lines.append(b"Date: " + _Date.now() + b"\r\n")
        if "Server" not in headers:
            lines.append(_SERVER)
        lines.append(b"\r\n")
        return b"".join(lines)

    def _frame(self, data: bytes, last: bool) -> bytes:
        if self._silent:
            data = b""
        elif self._chunked:
            data = (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + (
                _LAST_CHUNK if last else b""
            )
        head, self._head = self._head, b""
        return head + data if head else data

    def encode_whole(self, request: Request, body: bytes) -> bytes:
        """The whole response, head and `body`, as bytes for `request` (marks it sent): for a
        caller that writes it at once itself."""
        self._request = request
        self.prepared = self.finished = True
        self._head = self._encode_head(request)
        return self._frame(body, last=True)

    async def write(self, data: bytes) -> None:
        request = self._request
        if request is None or request.channel is None:
            raise RuntimeError("write() before prepare()")
        if not data and not self._head:
            return
        request.channel.write(self._frame(data, last=False))
        await request.channel.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.finished:
            return
        request = self._request
        if request is None or request.channel is None:
            raise RuntimeError("write_eof() before prepare()")
        self.finished = True
        request.channel.write(self._frame(data, last=True))
        await request.channel.drain()


class Response(StreamResponse):
    """A response whose whole body is known; the server sends it once the handler returns."""

    def __init__(self, *, status: int = 200, body: bytes = b"", reason: str | None = None,
                 headers: HeaderSource | None = None,
                 content_type: str | None = None) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self.body = body
        self.content_length = len(body)
        if content_type is not None:
            self.headers["Content-Type"] = content_type

    def encode(self, request: Request) -> bytes:
        """The whole response as bytes for `request`, head and body (marks it sent)."""
        return self.encode_whole(request, self.body)

    async def send(self, request: Request) -> None:
        channel = request.channel
        if channel is None:
            raise RuntimeError("send() needs the request's connection")
        channel.write(self.encode(request))
        await channel.drain()
