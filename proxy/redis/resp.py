"""A small RESP2 client for one standalone Redis: the idempotency store's hot path.

redis-py's asyncio client spends about 60 µs of CPU per command here (pool checkout under an
`asyncio.timeout` and a `Condition`, the retry wrapper, observability hooks, the stream reader);
this one spends about 10. Each connection is an `asyncio.Protocol` with the hiredis reader and
carries any number of commands at once: replies come back in order, so each one is matched to
its command by position. Commands sent in one pass of the event loop leave in one write (under
load, one system call carries the claims of many requests). A caller that gives up (its
deadline passed) leaves its slot in the queue; the late reply is read and dropped, never handed
to the next command. The connection is closed all the same, as redis-py does, so a stalled
server is reconnected to rather than queued behind.

Deadlines belong to the caller (the store passes its budget's end with each command);
connecting has its own bound. A connection does not arm a timer per command (an
`asyncio.timeout` per command cost more than the rest of the client): one watchdog timer at the
earliest pending deadline, re-armed when it fires, fails the overdue commands and gives the
connection up, as a caller that gives up does. A command that meets a broken connection is
sent once more on a fresh one: the store's scripts are safe to repeat for their owner.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis

Arg = bytes | str | int


class RespError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`, `-READONLY ...`)."""


class RespConnectionError(Exception):
    """The connection could not be made, or broke before the reply arrived."""


def _bulks(args: Iterable[Arg]) -> list[bytes]:
    """Each argument as a RESP bulk string. One loop, not a function per argument: a keyed
    request packs about 15 of them."""
    out = []
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return out


class Lead:
    """The first arguments of a command sent many times with the same start (`EVALSHA <sha> 1`),
    packed once: each send then packs only the arguments that change."""

    __slots__ = ("count", "data")

    def __init__(self, *args: Arg) -> None:
        self.count = len(args)
        self.data = b"".join(_bulks(args))


NO_LEAD = Lead()


def pack(args: Sequence[Arg], lead: Lead = NO_LEAD) -> bytes:
    """One command (`lead` then `args`) as a RESP array of bulk strings."""
    return b"".join((b"*%d\r\n" % (lead.count + len(args)), lead.data, *_bulks(args)))


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader = hiredis.Reader()
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._deadlines: deque[float] = deque()  # of the pending commands, in the same order
        # The watchdog and when it fires. uvloop's call_at returns a plain Handle, which has no
        # when(), for a deadline already past: the time is kept here.
        self._watchdog: asyncio.Handle | None = None
        self._watchdog_at = math.inf
        self._transport: asyncio.Transport | None = None
        # Commands sent during one pass of the event loop, written together at its end: one
        # write system call for all the requests that reached Redis in that pass.
        self._out: list[bytes] = []
        self.closed = False
        self.answered = False  # at least one reply came: a later break is not a refusal

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if not self._pending:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                waiter = self._pending.popleft()
                self._deadlines.popleft()
                self.answered = True
                if waiter.done():  # its caller gave up: the reply is dropped here
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(RespError(str(reply)))
                else:
                    waiter.set_result(reply)
        except hiredis.ProtocolError as exc:
            self._fail(f"protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_pending(f"connection lost: {exc or 'closed by the server'}")

    def send(self, command: bytes, deadline: float = math.inf) -> asyncio.Future[Any]:
        waiter = self._loop.create_future()
        self._pending.append(waiter)
        self._deadlines.append(deadline)
        if deadline < self._watchdog_at:
            # Unarmed, or armed for a later deadline (a caller with a longer budget): move it
            # earlier.
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._arm(deadline)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(command)
        return waiter

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not self.closed:  # else every waiter has failed already
            assert self._transport is not None
            self._transport.write(b"".join(out))

    def _check(self) -> None:
        """The watchdog: fails the overdue commands (and gives the connection up, as for a
        caller that gave up), or re-arms at the earliest deadline still pending."""
        self._watchdog, self._watchdog_at = None, math.inf
        now = self._loop.time()
        earliest = min(self._deadlines, default=math.inf)
        if earliest > now:
            if earliest != math.inf:
                self._arm(earliest)
            return
        for waiter, deadline in zip(self._pending, self._deadlines, strict=True):
            if deadline <= now and not waiter.done():
                waiter.set_exception(TimeoutError("redis did not answer by the deadline"))
        self._fail("a command timed out: the server stalled or is too slow")

    def _arm(self, deadline: float) -> None:
        self._watchdog, self._watchdog_at = self._loop.call_at(deadline, self._check), deadline

    async def call(self, command: bytes, deadline: float = math.inf) -> Any:
        waiter = self.send(command, deadline)
        try:
            return await waiter
        except asyncio.CancelledError:
            self.gave_up()
            raise

    def gave_up(self) -> None:
        """A caller gave up mid-command: the reply may still come, or the server may be
        stalled; either way the connection is not trusted with another command."""
        self.close()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog, self._watchdog_at = None, math.inf
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()

    def _fail(self, reason: str) -> None:
        self.close()
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        self._deadlines.clear()
        while self._pending:
            waiter = self._pending.popleft()
            if not waiter.done():
                waiter.set_exception(RespConnectionError(reason))


class RespClient:
    """`connections` multiplexed connections to one server, opened on first use and replaced
    when they break."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float,
        connections: int = 2,
    ) -> None:
        self.address = f"{host}:{port}"
        self._host = host
        self._port = port
        self._handshake: list[bytes] = []
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._handshake.append(pack(auth))
        if db:
            self._handshake.append(pack(("SELECT", db)))
        self._connect_timeout = connect_timeout
        self._slots: list[asyncio.Task[_Connection] | None] = [None] * connections
        self._next = 0

    async def execute(self, *args: Arg) -> Any:
        return await self.call(pack(args))

    async def call(self, command: bytes, deadline: float | None = None) -> Any:
        """A command packed by `pack`, answered by `deadline` (loop time) or TimeoutError.

        The one coroutine per command: an open connection is taken and its reply awaited
        here, not in nested coroutines, because every level is created per command and
        resumed again when the reply wakes the caller (two commands per keyed request)."""
        end = math.inf if deadline is None else deadline
        connection = self._open() or await self._connection(deadline)
        try:
            return await connection.send(command, end)
        except asyncio.CancelledError:
            connection.gave_up()
            raise
        except RespConnectionError:
            if not connection.answered:
                raise
        # The connection had worked and broke (a restarted server): once more on a fresh one.
        return await (await self._connection(deadline)).call(command, end)

    async def close(self) -> None:
        slots, self._slots = self._slots, [None] * len(self._slots)
        for slot in slots:
            if slot is None:
                continue
            if not slot.done():
                slot.cancel()
            elif not slot.cancelled() and slot.exception() is None:
                slot.result().close()

    def _open(self) -> _Connection | None:
        """The next connection in turn if it is open (the common case: no await, no timer),
        else None, and `_connection` makes or awaits one for that turn."""
        index = self._next
        slot = self._slots[index]
        if (slot is not None and slot.done() and not slot.cancelled()
                and slot.exception() is None and not slot.result().closed):
            self._next = (index + 1) % len(self._slots)
            return slot.result()
        return None

    async def _connection(self, deadline: float | None = None) -> _Connection:
        connection = self._open()
        if connection is not None:
            return connection
        index = self._next
        self._next = (index + 1) % len(self._slots)
        slot = self._slots[index]
        if slot is None or slot.done():  # none yet, or one that failed or closed
            slot = self._slots[index] = asyncio.ensure_future(self._connect())
        # Shielded: a caller that gives up does not cancel the connect others wait for.
        if deadline is None:
            return await asyncio.shield(slot)
        async with asyncio.timeout_at(deadline):
            return await asyncio.shield(slot)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port
                )
                try:
                    for command in self._handshake:
                        await connection.call(command)
                except RespError:
                    connection.close()
                    raise
        except TimeoutError:
            raise RespConnectionError(
                f"connect to {self.address} timed out after {self._connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise RespConnectionError(f"cannot connect to {self.address}: {exc}") from exc
        return connection
