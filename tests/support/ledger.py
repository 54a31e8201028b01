"""A ledger upstream for the at-most-once guarantee test: a raw asyncio HTTP/1.1 server that
records every execution by Idempotency-Key and answers 201 with a body naming the execution,
with faults injected at random (seeded) per request:

- `reset_reused`: on a reused keep-alive connection, execute, then reset before any response
  byte (what a stale-connection resend would repeat);
- `reset_mid`: execute, send the head and half the body, then reset;
- `slow`: execute, then answer only after `slow_seconds` (longer than the proxy's upstream
  timeout, so the proxy has given up).

Every fault happens after the execution is recorded: the upstream did the work, only its answer
is lost, which is exactly the case a proxy cannot tell from "not run".
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum

import orjson


class Fault(StrEnum):
    NONE = "none"
    RESET_REUSED = "reset_reused"
    RESET_MID = "reset_mid"
    SLOW = "slow"


@dataclass
class FaultPlan:
    """Probabilities per request; `reset_reused` applies only to reused connections."""

    reset_reused: float = 0.0
    reset_mid: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 1.0
    seed: int = 13

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def pick(self, reused: bool) -> Fault:
        roll = self._random.random()
        for fault, chance in (
            (Fault.RESET_REUSED, self.reset_reused if reused else 0.0),
            (Fault.RESET_MID, self.reset_mid),
            (Fault.SLOW, self.slow),
        ):
            if roll < chance:
                return fault
            roll -= chance
        return Fault.NONE


@dataclass
class Ledger:
    plan: FaultPlan = field(default_factory=FaultPlan)
    # key -> execution numbers, and each execution's exact response body.
    executions: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    bodies: dict[int, bytes] = field(default_factory=dict)
    faults: dict[Fault, int] = field(default_factory=lambda: defaultdict(int))
    in_progress: int = 0
    # Requests being executed now: the proxy's local port -> when the request arrived.
    serving: dict[int, float] = field(default_factory=dict)
    url: str = ""
    # Requests still to be answered slowly whatever the plan says (`hold_next`).
    forced_slow: int = 0
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> Ledger:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()

    def fresh_requests(self, younger_than: float) -> list[int]:
        """The proxy-side ports of requests in progress that arrived less than `younger_than`
        seconds ago (so their proxy is still waiting for the answer)."""
        now = asyncio.get_running_loop().time()
        return [port for port, since in self.serving.items() if now - since < younger_than]

    def hold_next(self) -> None:
        """Answer the next request slowly (`slow`), so some proxy is surely waiting for the
        upstream while a test looks for one to kill, however fast the rest of the run goes."""
        self.forced_slow += 1

    def duplicates(self) -> dict[str, int]:
        return {key: len(runs) for key, runs in self.executions.items() if len(runs) > 1}

    def _execute(self, key: str) -> bytes:
        number = len(self.bodies) + 1
        body = orjson.dumps({"execution": number, "key": key})
        self.executions[key].append(number)
        self.bodies[number] = body
        return body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        peer_port = writer.get_extra_info("peername")[1]
        self._open.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                headers = _headers(head)
                await reader.readexactly(int(headers.get("content-length", "0")))
                served += 1
                fault = self.plan.pick(reused=served > 1)
                if self.forced_slow:
                    self.forced_slow -= 1
                    fault = Fault.SLOW
                self.faults[fault] += 1
                self.in_progress += 1
                self.serving[peer_port] = asyncio.get_running_loop().time()
                try:
                    if not await self._answer(writer, headers.get("idempotency-key", ""), fault):
                        return
                finally:
                    self.in_progress -= 1
                    self.serving.pop(peer_port, None)
        except asyncio.CancelledError:
            return  # the test's loop is closing: a connection handler just ends
        finally:
            self._open.discard(writer)
            writer.transport.abort()

    async def _answer(self, writer: asyncio.StreamWriter, key: str, fault: Fault) -> bool:
        """Execute and answer (or fail to); False when the connection is gone."""
        body = self._execute(key)
        response = (
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if fault == Fault.RESET_REUSED:
            _reset(writer)
            return False
        if fault == Fault.RESET_MID:
            writer.write(response[: len(response) - len(body) // 2])
            await writer.drain()
            _reset(writer)
            return False
        if fault == Fault.SLOW:
            await asyncio.sleep(self.plan.slow_seconds)  # the injected fault: a slow upstream
        try:
            writer.write(response)
            await writer.drain()
        except ConnectionError:
            return False
        return True


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees a reset, not an orderly end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
