"""The client side of a data-port connection: its socket's lifetime and flow control.

`ClientConnection` is what `HttpProtocol` (proxy/server/protocol.py) stands on, apart from
parsing: the connection's `Phase`, why reading is paused (`Pause`), waiting while the client is
slow to read (`drain`, bounded by `limits.write_timeout`), the one deadline timer, and the three
ways a connection ends (close, lingering close, reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from enum import Enum

# After an early answer (413, 408) the unread rest of the body is read and dropped this long
# before closing: closing with unread bytes sends a reset, which can destroy the answer.
LINGERING_TIME = 1.0
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops unsent data
# While reading is paused for a body the upstream is slow to take, the loop does not watch the
# socket, so a client that leaves would go unnoticed until the upstream's timeout: its TCP state
# is read this often instead (Linux TCP_INFO; CLOSE, CLOSE_WAIT, LAST_ACK: the peer is gone).
PAUSED_PROBE = 1.0
_PEER_GONE = frozenset({7, 8, 9})
_TCP_INFO = getattr(socket, "TCP_INFO", None)


class Phase(Enum):
    IDLE = "idle"  # no request begun: the header deadline runs (keep-alive idle time)
    HEAD = "head"  # a head is arriving: the header deadline runs
    BUSY = "busy"  # a request is being handled (body and write deadlines are the stages')
    LINGER = "linger"  # answered early: discarding the rest until EOF or LINGERING_TIME
    CLOSED = "closed"


# The phases as module globals, which the per-request code reads: on Python 3.11 reading
# `Phase.IDLE` goes through EnumType.__getattr__'s slot, a call through the metaclass (about
# 0.5k instructions against a few dozen for a global; docs/performance.md).
IDLE, HEAD, BUSY, LINGER, CLOSED = Phase.IDLE, Phase.HEAD, Phase.BUSY, Phase.LINGER, Phase.CLOSED


class Pause:
    """Why reading from the client is paused: bits of one int, so that setting and testing
    them per request is integer arithmetic (a `Flag`'s operators are Python calls). Reading
    resumes when no bit is left."""

    BODY = 1  # a request body waits unread beyond BODY_HIGH_WATER
    PIPELINE = 2  # a parsed request waits for the one before it
    REFUSED = 4  # the parser refused the input: nothing more is read


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_deadline", "_drained", "_paused_by", "_probe", "_timer", "_write_paused", "loop",
        "phase", "transport", "write_timeout",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, write_timeout: float) -> None:
        self.loop = loop
        self.write_timeout = write_timeout
        self.transport: asyncio.Transport | None = None
        self.phase = IDLE
        self._paused_by = 0  # Pause bits
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.TimerHandle | None = None

    def _lost(self, gone: Exception) -> None:
        """The socket is gone: no deadline, no writer left waiting."""
        self.phase = CLOSED
        for timer in (self._timer, self._probe):
            if timer is not None:
                timer.cancel()
        self._timer = self._probe = None
        waiter = self._drained
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drained
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing connection")
        transport.write(data)

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("cannot write to a closing connection")
        self._drained = self.loop.create_future()
        try:
            async with asyncio.timeout(self.write_timeout):
                await self._drained
        except TimeoutError:
            self.abort()
            raise ConnectionResetError("the client did not read the response in time") from None
        finally:
            self._drained = None

    def _close(self, linger: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.phase = CLOSED
            return
        if linger and transport.can_write_eof():
            self.phase = LINGER
            transport.write_eof()  # the answer, then EOF; the client's rest is read and dropped
            self._resume(Pause.BODY)
            self._resume(Pause.PIPELINE)
            self._set_deadline(self.loop.time() + LINGERING_TIME)
            return
        self.phase = CLOSED
        transport.close()

    def abort(self) -> None:
        """Reset the connection now. Without SO_LINGER 0 the kernel would keep the socket and
        its unsent megabytes alive for a slow reader, closing politely only once they drain."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()

    def _set_deadline(self, when: float | None) -> None:
        """One timer per connection, re-armed lazily: moving the deadline later (each request)
        costs an assignment, not a cancelled TimerHandle left in the loop's heap. Only a deadline
        earlier than the armed timer (the lingering close after a head deadline) re-arms it."""
        self._deadline = when
        timer = self._timer
        if when is None or (timer is not None and timer.when() <= when):
            return
        if timer is not None:
            timer.cancel()
        self._timer = self.loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.phase is CLOSED:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_deadline)
            return
        # No head within header_timeout (idle keep-alive, or a slowloris), or lingering is over.
        self._deadline = None
        self.phase = CLOSED
        if self.transport is not None:
            self.transport.close()

    def _pause(self, reason: int) -> None:
        if not self._paused_by and self.transport is not None:
            self.transport.pause_reading()
        self._paused_by |= reason
        if reason == Pause.BODY and self._probe is None and _TCP_INFO is not None:
            self._probe = self.loop.call_later(PAUSED_PROBE, self._probe_peer)

    def _probe_peer(self) -> None:
        """Paused for a body: end the connection if the client has left (connection_lost then
        tells the request, as when the loop sees it)."""
        self._probe = None
        transport = self.transport
        if not self._paused_by & Pause.BODY or transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] if sock else 0
        except OSError:
            state = 0
        if state in _PEER_GONE:
            transport.abort()
            return
        self._probe = self.loop.call_later(PAUSED_PROBE, self._probe_peer)

    def _resume(self, reason: int) -> None:
        if not self._paused_by & reason:
            return
        self._paused_by &= ~reason
        if not self._paused_by and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
