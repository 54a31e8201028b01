"""A blocking raw-socket HTTP/1.1 client: sends exact bytes, parses exactly what comes back."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # False when the connection ended before the framing said the body was complete.
    complete: bool

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def problem(self) -> dict[str, Any]:
        assert self.header("Content-Type") == "application/problem+json", self.headers
        document: dict[str, Any] = orjson.loads(self.body)
        assert document["status"] == self.status
        assert document["trace_id"] == self.header("X-Trace-Id")
        return document


class RawConnection:
    # Send this many first bytes of the connection one byte per segment (0: as given). Set by
    # tests/conformance/conftest.py for its bytewise runs.
    bytewise_prefix = 0

    def __init__(self, port: int, timeout: float = 5, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.split_left = self.bytewise_prefix
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        split = min(self.split_left, len(data))
        for index in range(split):
            try:
                self.sock.sendall(data[index : index + 1])
            except (BrokenPipeError, ConnectionResetError):
                # The proxy answered early and closed (a refusal at the first bad byte): what
                # it said is read next, as a client that stops sending on a closed socket would.
                return
        self.split_left -= split
        if split < len(data):
            self.sock.sendall(data[split:])

    def _fill(self) -> bool:
        """Read more into the buffer; False at the end of the connection."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def _take_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if not self._fill():
                return None
        item, self.buffer = self.buffer.split(marker, 1)
        return item

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size and self._fill():
            pass
        item, self.buffer = self.buffer[:size], self.buffer[size:]
        return item

    def read_response(self, head_request: bool = False) -> RawResponse | None:
        """The next response; None when the connection ended before a full response head."""
        head = self._take_until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        names = {k.lower(): v for k, v in headers}
        if head_request or status in (204, 304) or status < 200:
            return RawResponse(status, headers, b"", True)
        if names.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while (size_line := self._take_until(b"\r\n")) is not None:
                size = int(size_line.split(b";")[0], 16)
                data = self._take(size + 2)
                body += data[:size]
                if len(data) < size + 2:
                    break
                if size == 0:
                    return RawResponse(status, headers, body, True)
            return RawResponse(status, headers, body, False)
        if "content-length" in names:
            length = int(names["content-length"])
            body = self._take(length)
            return RawResponse(status, headers, body, len(body) == length)
        while self._fill():
            pass
        body, self.buffer = self.buffer, b""
        return RawResponse(status, headers, body, True)

    def closed_within(self, seconds: float) -> bool:
        """True when the peer closes the connection within `seconds` (unread data is dropped)."""
        deadline = time.monotonic() + seconds
        previous = self.sock.gettimeout()
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if not self._fill():
                        return True
                except TimeoutError:
                    return False
            return False
        finally:
            self.sock.settimeout(previous)

    def still_serves(self) -> bool:
        """True when the connection answers one more ordinary request (it was kept alive)."""
        try:
            self.send(b"GET /keepalive-probe HTTP/1.1\r\nHost: a\r\n\r\n")
        except OSError:
            return False
        response = self.read_response()
        return response is not None and response.status == 200


def exchange(
    port: int, data: bytes, timeout: float = 5
) -> tuple[RawResponse | None, RawConnection]:
    """Send `data` on a new connection and read one response; the caller closes the connection."""
    connection = RawConnection(port, timeout)
    connection.send(data)
    return connection.read_response(), connection
