"""The data plane's request: what the server parsed, and the body as it arrives.

The server (proxy/server/protocol.py) builds one per request from llhttp's callbacks; the
stages read it and never see the parser, the socket or aiohttp.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.http.problem import ProblemType


class Version(NamedTuple):
    major: int
    minor: int


HTTP_10 = Version(1, 0)
HTTP_11 = Version(1, 1)


class Channel(Protocol):
    """The client connection as the response side needs it (the server's protocol)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def write(self, data: bytes) -> None:
        """Queue bytes for the client; raises ConnectionResetError once it is gone."""
        ...

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        ...

    def abort(self) -> None:
        """Reset the connection now, dropping whatever is unsent."""
        ...


class BodyFramingError(Exception):
    """The parser refused the body's framing after the head was accepted (a bad chunk, too many
    trailers): the request cannot be completed and the connection cannot be reused."""

    def __init__(self, problem: ProblemType, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem


class Body:
    """The request body, fed by the server as it arrives and read by one consumer.

    The server pauses reading from the socket while more than `high` bytes wait here, and
    resumes once the consumer took them (`on_drained`): a slow upstream slows the client."""

    __slots__ = ("_chunks", "_eof", "_error", "_waiter", "buffered", "high", "on_drained")

    def __init__(self, high: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.buffered = 0
        self.high = high
        self.on_drained: Callable[[], None] | None = None

    def feed(self, chunk: bytes) -> bool:
        """Queue a chunk; True when the server should pause reading."""
        self._chunks.append(chunk)
        self.buffered += len(chunk)
        self._wake()
        return self.buffered > self.high

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._eof:
            self._error = error
        self._wake()

    def is_eof(self) -> bool:
        """Every byte has arrived (reading may still return the queued ones)."""
        return self._eof

    @property
    def complete(self) -> bool:
        """Everything arrived and was read: nothing of this request is left on the wire."""
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        """The next chunk; b"" once the body ended. Raises what broke the body."""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._taken(len(chunk))
        return chunk

    def take_all(self) -> bytes:
        """Every queued byte at once, for a body that has ended (`is_eof`): a small body comes
        with its head, and one over the high-water mark may have ended before reading paused."""
        chunks = self._chunks
        whole = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._taken(self.buffered)
        return whole

    def _taken(self, size: int) -> None:
        """`size` bytes left the queue: resume the server's reading if it paused for them."""
        was_over = self.buffered > self.high
        self.buffered -= size
        if was_over and self.buffered <= self.high and self.on_drained is not None:
            self.on_drained()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def text(raw: bytes) -> str:
    """Request bytes as the stages' str."""
    # The h1 client encodes the same way: bytes go upstream exactly as they came.
    return raw.decode("utf-8", "surrogateescape")


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Request:
    """One parsed request head, with its body stream (`content`)."""

    __slots__ = (
        "channel", "content", "content_length", "headers", "keep_alive", "method", "on_lost",
        "query_string", "raw_headers", "raw_path", "remote", "version",
    )

    scheme = "http"  # the data port serves plain HTTP (TLS ends in front of the proxy)

    def __init__(
        self,
        method: str,
        raw_path: str,
        query_string: str,
        version: Version,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        remote: str,
        channel: Channel | None,
        content: Body | None,
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.raw_path = raw_path  # the target's path, as sent (absolute-form: its path)
        self.query_string = query_string  # after "?", as sent; "" when none
        self.version = version
        self.raw_headers = raw_headers
        self.headers: CIMultiDictProxy[str] = (
            # text() spelled out: two calls per field fewer on every request.
            CIMultiDictProxy(CIMultiDict([
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in raw_headers
            ]))
            if raw_headers
            else _NO_HEADERS
        )
        self.remote = remote
        self.channel = channel
        self.content = content  # None: the request has no body
        self.content_length: int | None = None
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self.keep_alive = keep_alive
        # Called by the server if the client's connection is lost while this request is being
        # handled (forward sets it when the exchange may be aborted); True: the server cancels
        # the handling (it owns the task: asking asyncio for it is a getpid() on Python 3.11).
        self.on_lost: Callable[[], bool] | None = None

    @classmethod
    def unparsed(cls, remote: str) -> Request:
        """Stands for a request the parser refused before its head was complete (for the log)."""
        return cls("", "", "", HTTP_11, (), remote, None, None, keep_alive=False)

    @property
    def body_exists(self) -> bool:
        return self.content is not None

    @property
    def host(self) -> str | None:
        return self.headers.get("Host")

    @property
    def transport(self) -> asyncio.Transport | None:
        return None if self.channel is None else self.channel.transport
