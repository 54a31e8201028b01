"""The RESP client against real redis-servers (and a raw socket server for protocol faults)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from proxy.redis.resp import Lead, RespClient, RespConnectionError, RespError, pack
from tests.support.faults import refusing_url, unanswered_url
from tests.support.redis_server import RedisServer


def test_pack_is_a_resp_array_of_bulk_strings() -> None:
    assert pack(("SET", b"k\r\n", 42)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n"
    assert pack(("PING",)) == b"*1\r\n$4\r\nPING\r\n"
    assert pack((b"k\r\n", 42), Lead("SET")) == pack(("SET", b"k\r\n", 42))


@pytest.fixture
def server(redis_server: Callable[..., RedisServer]) -> RedisServer:
    return redis_server()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[RespClient]:
    resp = RespClient("127.0.0.1", server.port, connect_timeout=1.0)
    yield resp
    await resp.close()


async def test_replies_in_their_types(client: RespClient) -> None:
    assert await client.execute("SET", "k", b"\x00\xff") == b"OK"
    assert await client.execute("GET", "k") == b"\x00\xff"
    assert await client.execute("GET", "missing") is None
    assert await client.execute("INCRBY", "n", 5) == 5
    assert await client.execute("EVAL", "return {1, 'a'}", 0) == [1, b"a"]
    with pytest.raises(RespError, match=r"^NOSCRIPT"):
        await client.execute("EVALSHA", "0" * 40, 0)
    with pytest.raises(RespError, match="WRONGTYPE"):
        await client.execute("HGET", "k", "field")


async def test_many_commands_at_once_each_get_their_own_reply(client: RespClient) -> None:
    replies = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(500)))
    assert replies == [f"m{i}".encode() for i in range(500)]


async def test_a_broken_connection_that_had_worked_is_replaced_once(
    client: RespClient, server: RedisServer
) -> None:
    assert await client.execute("PING") == b"PONG"
    assert await client.execute("PING") == b"PONG"  # both connections open
    killed = int(server.cli("CLIENT", "KILL", "TYPE", "normal"))
    assert killed >= 2
    assert await client.execute("ECHO", "after") == b"after"


async def test_auth_and_database_are_set_on_every_connection(
    redis_server: Callable[..., RedisServer],
) -> None:
    server = redis_server("--requirepass", "s3cret", "--user", "app", "on", ">apppw", "~*", "+@all")
    plain = RespClient("127.0.0.1", server.port, password="s3cret", db=3, connect_timeout=1.0)
    named = RespClient(
        "127.0.0.1", server.port, username="app", password="apppw", db=3, connect_timeout=1.0
    )
    wrong = RespClient("127.0.0.1", server.port, password="nope", connect_timeout=1.0)
    try:
        assert await plain.execute("SET", "where", "db3") == b"OK"
        assert await named.execute("GET", "where") == b"db3"
        assert server.cli("-a", "s3cret", "--no-auth-warning", "-n", "3", "GET", "where") == "db3"
        with pytest.raises(RespError):
            await wrong.execute("PING")
    finally:
        for resp in (plain, named, wrong):
            await resp.close()


async def test_unreachable_servers_fail_fast_and_within_the_connect_bound() -> None:
    port = int(refusing_url().rsplit(":", 1)[1])
    with pytest.raises(RespConnectionError, match="cannot connect"):
        await RespClient("127.0.0.1", port, connect_timeout=1.0).execute("PING")
    with unanswered_url() as url:
        port = int(url.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RespConnectionError, match="timed out"):
            await RespClient("127.0.0.1", port, connect_timeout=0.3).execute("PING")
        assert loop.time() - started < 0.3 + 0.5


async def test_a_server_speaking_garbage_is_cut_off() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"?not resp\r\n")
        await writer.drain()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    resp = RespClient("127.0.0.1", port, connect_timeout=1.0, connections=1)
    try:
        with pytest.raises(RespConnectionError, match="protocol error"):
            await resp.execute("PING")
    finally:
        await resp.close()
        server.close()
        await server.wait_closed()


def test_a_deadline_already_past_fails_its_command_and_not_the_next_call() -> None:
    """A caller whose budget ran out before its command was sent (a stalled store ate it), and
    another command in the same pass of the loop: the first times out, the second goes on (on a
    fresh connection, the stalled one given up). On uvloop, the product's loop, a past deadline
    is armed as a plain Handle without when(); reading it once turned the second command into
    an AttributeError (a 500)."""
    uvloop.run(_past_deadline_then_another_command())


async def _past_deadline_then_another_command() -> None:
    ping = pack(("PING",))

    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(ping))
        writer.write(b"+PONG\r\n")  # the first command on each connection, then silence
        await reader.read()

    server = await asyncio.start_server(answers_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    resp = RespClient("127.0.0.1", port, connect_timeout=1.0, connections=1)
    loop = asyncio.get_running_loop()
    try:
        assert await resp.call(ping) == b"PONG"  # the connection is open and has answered
        overdue = asyncio.ensure_future(resp.call(ping, loop.time() - 1.0))
        later = asyncio.ensure_future(resp.call(ping, loop.time() + 5.0))
        with pytest.raises(TimeoutError):
            await overdue
        assert await asyncio.wait_for(later, 2) == b"PONG"
    finally:
        await resp.close()
        server.close()
        await server.wait_closed()


async def test_a_deadline_fails_the_overdue_commands_and_gives_the_connection_up() -> None:
    """One watchdog per connection: a short deadline behind a long one still ends on time, and
    the connection that stalled is not reused."""
    connections = 0
    received = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read(1)
        received.set()  # the long-deadline command is on the wire (its watchdog armed)
        await reader.read()  # reads and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    resp = RespClient("127.0.0.1", port, connect_timeout=1.0, connections=1)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        late = asyncio.ensure_future(resp.call(pack(("PING",)), started + 5.0))
        await asyncio.wait_for(received.wait(), 2)
        with pytest.raises(TimeoutError):
            await resp.call(pack(("PING",)), started + 0.2)
        assert 0.2 <= loop.time() - started < 1.0
        with pytest.raises(RespConnectionError):  # given up with the stalled connection
            await late
        with pytest.raises(TimeoutError):
            await resp.call(pack(("PING",)), loop.time() + 0.1)
        assert connections == 2
    finally:
        await resp.close()
        server.close()
        await server.wait_closed()
