"""The data-port server's bounds against a real `idemproxy run`: flow control both ways (the
proxy's memory stays flat whichever side is slow), the head deadline counted from the accept or
the previous answer whatever the client trickles, and the lingering close after an early answer.

Memory is the process's VmRSS sampled while the slow side holds the transfer up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.raw_upstream import RawUpstream, endless
from tests.support.strict_http import StrictReader, connect

DEADLINE = 1.0  # limits.header_timeout and limits.write_timeout
SLACK = 1.0  # a loaded 2-core machine: timers fire late, never early
LINGERING_TIME = 1.0  # proxy/server/connection.py
MiB = 1024 * 1024
BIG = 200 * MiB
MAX_GROWTH = 30 * MiB
UPSTREAM_RATE = 1 * MiB  # bytes per second the slow upstream reads
HOLD = 3.0  # seconds a slow side holds the transfer up while memory is sampled


class SlowReader:
    """An upstream that reads request bytes at UPSTREAM_RATE and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.01)
        self.port = self.listener.getsockname()[1]
        self.read = 0
        self.stop = threading.Event()
        self.hang_up = threading.Event()  # close the connections so far (the exchange fails)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conns: list[socket.socket] = []
        started = 0.0  # the rate counts from the first connection
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
                conn.setblocking(False)
                conns.append(conn)
                started = started or time.monotonic()
            except TimeoutError:
                pass
            if self.hang_up.is_set():
                for conn in conns:
                    conn.close()
                conns.clear()
                self.hang_up.clear()
            for conn in conns:
                allowed = int((time.monotonic() - started) * UPSTREAM_RATE) - self.read
                if allowed > 0:
                    with contextlib.suppress(BlockingIOError):
                        self.read += len(conn.recv(min(allowed, 256 * 1024)))
        for conn in conns:
            conn.close()
        self.listener.close()


@pytest.fixture(scope="module")
def slow_reader() -> Iterator[SlowReader]:
    reader = SlowReader()
    yield reader
    reader.stop.set()
    reader.thread.join(5)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, slow_reader: SlowReader
) -> Iterator[tuple[ProxyProcess, RawUpstream]]:
    upstream = RawUpstream().start()
    config = base_config(upstream.url, limits={
        "header_timeout": "1s", "write_timeout": "1s", "body_timeout": "30s",
        "max_request_body": "1GiB",
    })
    config["upstreams"]["app"]["timeout"] = "30s"
    config["upstreams"]["slow"] = {"url": f"http://127.0.0.1:{slow_reader.port}",
                                   "connect_timeout": "1s", "timeout": "30s"}
    config["routes"] = [
        {"name": "slow", "match": {"path_prefix": "/slow-upload"}, "upstream": "slow"},
        {"name": "x", "match": {"path_prefix": "/"}, "upstream": "app"},
    ]
    proxy = ProxyProcess(Path(tmp_path_factory.mktemp("limits")), config).start()
    try:
        yield proxy, upstream
    finally:
        proxy.stop()
        upstream.stop()


def rss(proxy: ProxyProcess) -> int:
    assert proxy.process is not None
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def peak_rss_while(proxy: ProxyProcess, busy: threading.Event, seconds: float) -> int:
    """The highest RSS sampled every 50 ms for `seconds` or until `busy` is cleared."""
    peak, until = rss(proxy), time.monotonic() + seconds
    while busy.is_set() and time.monotonic() < until:
        peak = max(peak, rss(proxy))
        time.sleep(0.05)  # the sampling period of a measurement, not a synchronisation
    return peak


@pytest.mark.slow
def test_an_upload_to_a_slow_upstream_pauses_the_client(
    stack: tuple[ProxyProcess, RawUpstream], slow_reader: SlowReader
) -> None:
    proxy, _ = stack
    sent = 0
    uploading = threading.Event()
    uploading.set()
    block = bytes(MiB)
    baseline = rss(proxy)
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /slow-upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BIG)

        def upload() -> None:
            nonlocal sent
            sock.settimeout(0.2)
            while uploading.is_set() and sent < BIG:
                try:
                    sent += sock.send(block[: min(MiB, BIG - sent)])
                except TimeoutError:
                    continue
                except OSError:
                    return

        uploader = threading.Thread(target=upload)
        uploader.start()
        try:
            peak = peak_rss_while(proxy, uploading, HOLD)
        finally:
            uploading.clear()
            uploader.join(5)
            # This client's FIN waits behind its body bytes still in flight, which the proxy
            # reads at the upstream's pace: the upstream's hang-up ends the exchange sooner.
            slow_reader.hang_up.set()
    print(f"sent {sent / MiB:.1f} MiB, upstream read {slow_reader.read / MiB:.1f} MiB, "
          f"proxy RSS +{(peak - baseline) / MiB:.1f} MiB")
    assert slow_reader.read > 0, "the upload never reached the upstream"
    # What the client got to send is what the upstream read plus the socket buffers on the
    # way, not the 200 MiB it offered: the proxy stopped reading.
    assert sent < 64 * MiB
    assert peak - baseline < MAX_GROWTH


def test_a_client_that_does_not_read_is_cut_with_memory_flat(
    stack: tuple[ProxyProcess, RawUpstream],
) -> None:
    proxy, upstream = stack
    cut = threading.Event()
    upstream.scripts["/big"] = endless(BIG, cut)
    baseline = rss(proxy)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    with sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        started = time.monotonic()
        waiting = threading.Event()
        waiting.set()
        threading.Thread(target=lambda: (cut.wait(DEADLINE + 10), waiting.clear())).start()
        peak = peak_rss_while(proxy, waiting, DEADLINE + 10)
        took = time.monotonic() - started
    print(f"cut after {took:.2f} s, proxy RSS +{(peak - baseline) / MiB:.1f} MiB")
    assert cut.is_set(), "the proxy never gave up on the client"
    assert DEADLINE * 0.8 < took < DEADLINE + SLACK + 1
    assert peak - baseline < MAX_GROWTH


# --- the head deadline ----------------------------------------------------------------------

PARTIAL_HEADS = [
    b"",
    b"G",
    b"GET /x HTTP/1.1\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-Long",
    b"GET /x HTTP/1.1\r\nHost: a\r\n\r",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Le",
]


async def closed_at(reader: asyncio.StreamReader) -> float:
    """When the proxy closes (its answers, if any, are read and dropped)."""
    while True:
        try:
            if not await reader.read(65536):
                break
        except ConnectionResetError:
            break
    return time.monotonic()


async def deadline_after(port: int, partial: bytes, answered_first: bool, trickle: bool) -> float:
    """Seconds from the accept (or the first answer) to the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    if answered_first:
        writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readuntil(b"ok")  # the scripted upstream's whole body
        start = time.monotonic()
    closing = asyncio.create_task(closed_at(reader))
    pieces = [partial[i : i + 1] for i in range(len(partial))] if trickle else [partial]
    for piece in pieces:
        if closing.done():
            break
        writer.write(piece)
        if trickle:
            await asyncio.sleep(0.1)  # the client's pace is the input here
    end = await asyncio.wait_for(closing, DEADLINE + SLACK + 2)
    writer.close()
    return end - start


async def test_the_head_deadline_runs_from_the_accept_or_the_answer_whatever_arrives(
    stack: tuple[ProxyProcess, RawUpstream],
) -> None:
    proxy, _ = stack
    shapes = [(p, first, trickle) for p in PARTIAL_HEADS for first in (False, True)
              for trickle in (False, True) if p or not trickle]
    took = await asyncio.gather(*(deadline_after(proxy.port, *shape) for shape in shapes))
    late = {(p[:12], first, trickle): round(t, 2) for (p, first, trickle), t
            in zip(shapes, took, strict=True)
            if not DEADLINE * 0.8 < t < DEADLINE + SLACK}
    assert late == {}


def test_an_early_answer_lingers_at_most_a_moment(stack: tuple[ProxyProcess, RawUpstream]) -> None:
    """413 by Content-Length while the client keeps sending: the answer arrives whole (no reset
    destroys it), then the proxy stops reading within LINGERING_TIME."""
    proxy, upstream = stack
    count = upstream.count
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (2 * 1024**3))
        reader = StrictReader(sock)
        sent_until = [0.0]
        [answer] = reader.read(1)
        answered = time.monotonic()

        def keep_sending() -> None:
            sock.settimeout(0.1)
            while time.monotonic() - answered < LINGERING_TIME + SLACK + 2:
                try:
                    sock.send(bytes(16384))
                except TimeoutError:
                    continue
                except OSError:  # reset: the proxy closed and no longer reads
                    break
            sent_until[0] = time.monotonic()

        sender = threading.Thread(target=keep_sending)
        sender.start()
        sender.join(LINGERING_TIME + SLACK + 5)
    assert answer.status == 413
    assert answer.header("connection") == "close"
    assert sent_until[0] - answered < LINGERING_TIME + SLACK
    assert upstream.count == count


def test_lingering_ends_on_time_under_a_long_header_timeout(proxy_process: Any) -> None:
    """The lingering close sets a deadline earlier than the head deadline armed at the accept
    (10 s here): it must still end the connection within LINGERING_TIME, not at 10 s."""
    upstream = RawUpstream().start()
    try:
        proxy = proxy_process(base_config(upstream.url, limits={
            "header_timeout": "10s", "max_request_body": "1KiB",
        }))
        with connect(proxy.port) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
            [answer] = StrictReader(sock).read(1)
            answered = time.monotonic()
            assert answer.status == 413
            sock.settimeout(0.1)
            ended = None
            while time.monotonic() - answered < 8:
                try:
                    sock.send(bytes(4096))
                except TimeoutError:
                    continue
                except OSError:  # reset: the proxy stopped lingering and closed
                    ended = time.monotonic()
                    break
        assert ended is not None and ended - answered < LINGERING_TIME + SLACK
    finally:
        upstream.stop()


def test_a_client_leaving_a_paused_upload_is_noticed(
    stack: tuple[ProxyProcess, RawUpstream], slow_reader: SlowReader
) -> None:
    """Reading is paused while the upstream is slow to take the body, so the loop does not
    watch the client's socket: the proxy reads its TCP state instead and ends the exchange
    soon after the client resets the connection, not at upstreams.*.timeout (30 s here). (A
    client's FIN waits behind the body bytes still in flight: TCP delivers it once the proxy
    reads them, and then the same check sees it.)"""
    proxy, _ = stack
    path = f"/slow-upload/leaving-{time.monotonic_ns()}"
    with connect(proxy.port) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                     % (path.encode(), BIG))
        sock.settimeout(0.2)
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < 3:  # fill the proxy's buffer and the socket's
            try:
                sent += sock.send(bytes(MiB))
            except TimeoutError:
                continue
        assert sent < BIG
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    left = time.monotonic()  # closed with SO_LINGER 0: a reset, as when a client gives up

    def logged() -> bool:
        return any(line.get("url.path") == path for line in proxy.json_lines())

    while not logged() and time.monotonic() - left < 15:
        time.sleep(0.05)
    took = time.monotonic() - left
    [line] = [line for line in proxy.json_lines() if line.get("url.path") == path]
    assert took < 2 * 1.0 + SLACK  # PAUSED_PROBE (proxy/server/connection.py), twice at most
    assert line["error.type"] == "client_disconnect"
