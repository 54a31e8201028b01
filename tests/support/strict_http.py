"""Exact-byte helpers for the data-port server's tests: a strict response reader (llhttp's own
response parser: every byte must belong to a well-framed response) and request builders."""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass

import httptools


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


class StrictReader:
    """Reads responses off a socket with llhttp's response parser: a framing error raises."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = httptools.HttpResponseParser(self)
        self.answers: list[Answer] = []
        self.begun = 0
        self.eof = False
        self._headers: list[tuple[str, str]] = []
        self._body = b""

    def on_message_begin(self) -> None:
        self.begun += 1
        self._headers, self._body = [], b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self.parser.get_status_code(), self._headers, self._body))

    def _fill(self) -> None:
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self.parser.feed_data(data)

    def read(self, count: int) -> list[Answer]:
        """Until `count` complete responses arrived in all (fails at EOF or the socket timeout)."""
        while len(self.answers) < count:
            assert not self.eof, f"closed after {len(self.answers)} of {count} responses"
            self._fill()
        return self.answers[:count]

    def read_to_eof(self) -> None:
        """The rest of the connection: no byte may be left outside a complete response."""
        while not self.eof:
            self._fill()
        assert self.begun == len(self.answers), "a response was cut short"


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def chunk(body: bytes, rng: random.Random) -> bytes:
    """`body` in chunks of random sizes (some with an extension), then the last chunk."""
    out, at = [], 0
    while at < len(body):
        size = min(rng.randint(1, max(1, len(body) // 3)), len(body) - at)
        ext = b";x=1" if rng.random() < 0.2 else b""
        out.append(b"%x%s\r\n%s\r\n" % (size, ext, body[at : at + size]))
        at += size
    return b"".join(out) + b"0\r\n\r\n"


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closes (what it still sends is dropped), or None."""
    started = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - started < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None
