"""THE guarantee (issue 13): a keyed request executes at most once on the upstream, whatever
fails, and every answer a client gets for it is that one execution's bytes.

Real processes only: `idemproxy run` (memory store; Redis; two replicas on one Redis;
`workers: 2` on Redis) in front of a ledger upstream (tests/support/ledger.py) that records
every execution and injects faults (reset after reading the request on a reused connection,
reset mid-response, slower than the upstream timeout), while concurrent clients retry each
operation with the same key and body the way a careful client does: on timeouts, 5xx,
connection errors, and any 409 or 503 that carries a Retry-After, after waiting it out. Process faults come on top:
SIGKILL of a replica or a worker mid-request (restarted), Redis SIGSTOP/SIGCONT and restart.

Asserted: 0 duplicate executions, every 2xx byte-identical to the execution the ledger
recorded for the key (including a replay asked for after each success), and a final outcome for
every operation: executed (+ replayed), indeterminate (409 outcome-indeterminate: run at most
once, maybe not at all), or never executed. The CI run is short; IDEMPROXY_GUARANTEE_LONG=1
runs 3,000 operations per topology.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.eventually import eventually
from tests.support.idempotency import idem_config
from tests.support.ledger import FaultPlan, Ledger
from tests.support.proxy_process import ProxyProcess
from tests.support.redis_server import RedisServer

LONG = os.environ.get("IDEMPROXY_GUARANTEE_LONG") == "1"
OPERATIONS = 3000 if LONG else 120
CLIENTS = 20 if LONG else 8
UPSTREAM_TIMEOUT = 0.5
# Each operation must reach a final outcome within this (leases are ~2 s; a restart ~3 s).
OPERATION_DEADLINE = 40.0
PROBLEM = "urn:idemproxy:problem:"

StartProxy = Callable[..., ProxyProcess]
StartRedis = Callable[..., RedisServer]


class Outcome(StrEnum):
    EXECUTED = "executed"
    INDETERMINATE = "indeterminate"
    UNRESOLVED = "unresolved"


@dataclass
class Operation:
    key: str
    body: bytes
    outcome: Outcome = Outcome.UNRESOLVED
    answers: list[bytes] = field(default_factory=list)  # every 2xx body the client received
    replayed: int = 0


@dataclass
class Run:
    operations: list[Operation]
    responses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    unexpected: list[str] = field(default_factory=list)
    # Set by `drive`: start one more operation now (a fault step that needs a request in
    # flight cannot count on the remaining traffic: a fast run may have none left).
    spawn: Callable[[], None] = lambda: None

    @property
    def finished(self) -> int:
        return sum(op.outcome != Outcome.UNRESOLVED for op in self.operations)


async def attempt(session: aiohttp.ClientSession, url: str, op: Operation, run: Run
                  ) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders] | None:
    headers = {"Idempotency-Key": op.key, "Content-Type": "application/json"}
    try:
        async with session.post(url + "/v1/pay", data=op.body, headers=headers) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError):
        run.connection_errors += 1
        return None
    run.responses[response.status] += 1
    return response.status, body, response.headers


async def settle(session: aiohttp.ClientSession, urls: Callable[[int], str], op: Operation,
                 run: Run) -> None:
    """Retry one operation to a final outcome; after a success, ask once more for the replay."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OPERATION_DEADLINE
    tries = 0
    while loop.time() < deadline and (op.outcome != Outcome.EXECUTED or not op.replayed):
        tries += 1
        answer = await attempt(session, urls(tries), op, run)
        pause = min(0.05 * 2 ** min(tries, 5), 1.0)
        if answer is not None:
            status, body, headers = answer
            problem = orjson_type(body) if status >= 400 else ""
            if status == 201:
                op.answers.append(body)
                if headers.get("Idempotent-Replayed") == "true":
                    op.replayed += 1
                op.outcome = Outcome.EXECUTED
                continue
            if problem == "outcome-indeterminate" and "Retry-After" not in headers:
                op.outcome = Outcome.INDETERMINATE  # final: no Retry-After invites a retry
                return
            if status in (409, 503) and "Retry-After" in headers:
                pause = float(headers["Retry-After"])  # honoured, as the docs ask
            elif status not in (502, 504):
                run.unexpected.append(f"{op.key}: {status} {body[:200]!r}")
                return
        await asyncio.sleep(pause)  # the client's own backoff between attempts


def orjson_type(body: bytes) -> str:
    import orjson

    try:
        kind = orjson.loads(body).get("type", "")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return str(kind).removeprefix(PROBLEM)


async def drive(urls: Callable[[int], str], chaos: Callable[[Run], Awaitable[None]]) -> Run:
    run = Run([Operation(str(uuid.uuid4()), b'{"amount":%d}' % i) for i in range(OPERATIONS)])
    queue = list(reversed(run.operations))
    timeout = aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT * 6)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client() -> None:
            while queue:
                await settle(session, urls, queue.pop(), run)

        spawned: list[asyncio.Task[None]] = []

        def spawn() -> None:
            op = Operation(str(uuid.uuid4()), b'{"amount":%d}' % len(run.operations))
            run.operations.append(op)
            spawned.append(asyncio.create_task(settle(session, urls, op, run)))

        run.spawn = spawn
        faults = asyncio.create_task(chaos(run))
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        await faults
        await asyncio.gather(*spawned)
    return run


def lease_expiries(*proxies: ProxyProcess) -> int:
    """Keys whose holder died and were then held (idempotency_lease_expired events)."""
    return sum(
        line.get("event") == "idempotency_lease_expired"
        for proxy in proxies
        for line in proxy.json_lines()
    )


def verify(run: Run, ledger: Ledger, topology: str, held_after_a_death: int = 0) -> None:
    outcomes = Counter(op.outcome for op in run.operations)
    executed_keys = set(ledger.executions)
    held_but_ran = sum(
        op.outcome == Outcome.INDETERMINATE and op.key in executed_keys for op in run.operations
    )
    print(
        f"\n[{topology}] operations={len(run.operations)} executions={len(ledger.bodies)} "
        f"duplicates={len(ledger.duplicates())} "
        f"replays={sum(op.replayed for op in run.operations)} "
        f"indeterminate={outcomes[Outcome.INDETERMINATE]} (of which executed: {held_but_ran}) "
        f"unresolved={outcomes[Outcome.UNRESOLVED]} 503s={run.responses[503]} "
        f"502s={run.responses[502]} 504s={run.responses[504]} 409s={run.responses[409]} "
        f"connection_errors={run.connection_errors} held_after_a_death={held_after_a_death} "
        f"faults={dict(ledger.faults)}"
    )
    assert not run.unexpected, run.unexpected[:5]
    assert ledger.duplicates() == {}, "executed more than once"
    assert executed_keys <= {op.key for op in run.operations}
    for op in run.operations:
        assert op.outcome != Outcome.UNRESOLVED, f"{op.key}: no final outcome"
        runs = ledger.executions.get(op.key, [])
        if op.outcome == Outcome.EXECUTED:
            assert len(runs) == 1, f"{op.key}: answered 201 but executed {len(runs)} times"
            assert op.replayed >= 1
            # Every 2xx is the bytes of the one execution, replays included.
            assert set(op.answers) == {ledger.bodies[runs[0]]}, op.key
    assert outcomes[Outcome.EXECUTED] > len(run.operations) // 2, "faults drowned the traffic"


def faulty_ledger() -> FaultPlan:
    return FaultPlan(reset_reused=0.06, reset_mid=0.06, slow=0.05,
                     slow_seconds=UPSTREAM_TIMEOUT + 0.3)


def config(ledger: Ledger, store_url: str, **extra: Any) -> dict[str, Any]:
    settings = idem_config(ledger.url, store_url, store={"timeout": "250ms"},
                           upstream={"timeout": f"{UPSTREAM_TIMEOUT}s"})
    settings.update(extra)
    return settings


async def after(run: Run, finished: int) -> None:
    """Wait until `finished` operations reached their outcome (bounded)."""
    await eventually(lambda: asyncio.sleep(0, run.finished >= finished), 60,
                     f"{finished} operations finished", step=0.05)


async def holder_of_a_request(ledger: Ledger, run: Run, pids: list[int]) -> int:
    """The pid of a proxy process (or worker) that is waiting for the upstream right now."""
    ledger.hold_next()  # the next request will surely wait...
    run.spawn()  # ...and there is a next one, even if the run is through

    async def found() -> int:
        ports = ledger.fresh_requests(UPSTREAM_TIMEOUT / 2)
        return next((pid for pid in pids if _local_ports(pid) & set(ports)), 0)

    return await eventually(found, 30, "a proxy waiting for the upstream", step=0.005)


def _local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds (from /proc)."""
    try:
        inodes = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
        }
    except OSError:  # gone, or an fd closed while listed
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def durable_redis(redis_server: StartRedis) -> RedisServer:
    """A Redis that keeps its records across a restart (AOF, fsync per write): without it a
    restart loses every record, like the memory store (see docs/guarantees.md)."""
    return redis_server("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
async def ledger() -> Any:
    started = await Ledger(faulty_ledger()).start()
    yield started
    await started.close()


@pytest.mark.slow
async def test_memory_store(proxy_process: StartProxy, ledger: Ledger) -> None:
    proxy = proxy_process(config(ledger, "memory://"))

    async def no_process_faults(run: Run) -> None:
        return None

    run = await drive(lambda _: proxy.url, no_process_faults)
    verify(run, ledger, "memory")


@pytest.mark.slow
async def test_redis_paused_and_restarted(
    proxy_process: StartProxy, redis_server: StartRedis, ledger: Ledger
) -> None:
    redis = durable_redis(redis_server)
    proxy = proxy_process(config(ledger, redis.url))

    async def redis_faults(run: Run) -> None:
        await after(run, OPERATIONS // 4)
        redis.stall()
        try:
            await asyncio.sleep(1.0)  # the injected fault: Redis paused for a second
        finally:
            redis.resume()
        await after(run, OPERATIONS // 2)
        await eventually(lambda: asyncio.sleep(0, ledger.fresh_requests(0.1)), 30,
                         "a request in progress", step=0.005)
        await asyncio.to_thread(redis.restart)

    run = await drive(lambda _: proxy.url, redis_faults)
    verify(run, ledger, "redis")


@pytest.mark.slow
async def test_two_replicas_one_killed_mid_request(
    proxy_process: StartProxy, redis_server: StartRedis, ledger: Ledger
) -> None:
    redis = durable_redis(redis_server)
    replicas = [proxy_process(config(ledger, redis.url)) for _ in range(2)]

    async def kill_and_restart(run: Run) -> None:
        for threshold in (OPERATIONS // 4, OPERATIONS // 2):
            await after(run, threshold)
            pids = [replica.process.pid for replica in replicas if replica.process is not None]
            pid = await holder_of_a_request(ledger, run, pids)
            (victim,) = (r for r in replicas if r.process is not None and r.process.pid == pid)
            victim.kill()
            await asyncio.to_thread(victim.start)

    # Each attempt goes to the other replica: a retry usually lands where the first did not.
    run = await drive(lambda tries: replicas[tries % 2].url, kill_and_restart)
    # The replica that found a dead holder's key held says so in an event (written at once).
    held = await eventually(lambda: asyncio.sleep(0, lease_expiries(*replicas)), 5,
                            "a killed holder's key found held")
    verify(run, ledger, "two replicas", held)


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    pids: dict[int, int] = {}
    for line in proxy.json_lines():
        if line.get("event") == "worker_started":
            pids[line["worker"]] = line["pid"]
    return pids


@pytest.mark.slow
async def test_two_workers_one_killed_mid_request(
    proxy_process: StartProxy, redis_server: StartRedis, ledger: Ledger
) -> None:
    redis = durable_redis(redis_server)
    proxy = proxy_process(config(ledger, redis.url, workers=2))

    async def kill_a_worker(run: Run) -> None:
        for threshold in (OPERATIONS // 4, OPERATIONS // 2):
            await after(run, threshold)
            workers = worker_pids(proxy)
            killed = await holder_of_a_request(ledger, run, list(workers.values()))
            os.kill(killed, signal.SIGKILL)
            index = next(i for i, pid in workers.items() if pid == killed)

            async def restarted(index: int = index, killed: int = killed) -> bool:
                return worker_pids(proxy).get(index) not in (None, killed)

            await eventually(restarted, 30, "the worker restarted", step=0.05)

    run = await drive(lambda _: proxy.url, kill_a_worker)
    held = await eventually(lambda: asyncio.sleep(0, lease_expiries(proxy)), 5,
                            "a killed holder's key found held")
    verify(run, ledger, "workers: 2", held)


def test_long_mode_is_documented() -> None:
    """The local long run is reachable from the docs, so nobody has to read this file."""
    guide = Path(__file__).parents[2] / "docs" / "guarantees.md"
    assert "IDEMPROXY_GUARANTEE_LONG=1" in guide.read_text()
