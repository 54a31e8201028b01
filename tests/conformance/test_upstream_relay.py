"""How the proxy relays what an upstream sends, and what it sends the upstream (issue 14, item
7): no invented Content-Type, an unsendable reason phrase replaced rather than answered with
aiohttp's own 500, the client's Host preserved (or the upstream's, per upstream), and an
exchange nobody will store aborted when its client goes away."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.idempotency import idem_config
from tests.support.ports import wait_until
from tests.support.proxy_process import ProxyProcess
from tests.support.raw_client import RawConnection, exchange
from tests.support.raw_upstream import RawUpstream


@dataclass
class Relay:
    proxy: ProxyProcess
    upstream: RawUpstream

    def access(self, path: str) -> dict[str, Any]:
        def line() -> dict[str, Any] | None:
            found = [
                entry for entry in self.proxy.json_lines()
                if entry.get("url.path") == path and "http.response.status_code" in entry
            ]
            return found[-1] if found else None

        return wait_until(line, 5, f"the access log line of {path}")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    upstream = RawUpstream().start()
    config = idem_config(upstream.url, "memory://", upstream={"timeout": "10s"})
    config["upstreams"]["origin"] = {"url": upstream.url, "host": "upstream"}
    config["routes"].insert(0, {"name": "origin", "match": {"path_prefix": "/origin"},
                                "upstream": "origin"})
    proxy = ProxyProcess(tmp_path_factory.mktemp("relay"), config).start()
    try:
        yield Relay(proxy, upstream)
    finally:
        proxy.stop()
        upstream.stop()


def get(path: str, host: str = "a") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def test_no_content_type_is_invented(relay: Relay) -> None:
    relay.upstream.scripts["/untyped"] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    response, connection = exchange(relay.proxy.port, get("/untyped"))
    with connection:
        assert response is not None and (response.status, response.body) == (200, b"ok")
        assert response.header("Content-Type") is None


@pytest.mark.parametrize("reason", [b"O\x01K", b"\x7f", b"a\x00b", b"Ok\x1b[31m"])
def test_a_control_character_in_the_reason_is_replaced(relay: Relay, reason: bytes) -> None:
    """Not aiohttp's own 500 (with its Server banner) while the log says 200: the status and
    body are relayed with the status's standard phrase, and the log tells the same."""
    path = f"/reason-{reason.hex()}"
    relay.upstream.scripts[path] = (
        b"HTTP/1.1 201 " + reason + b"\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    )
    with RawConnection(relay.proxy.port) as connection:
        connection.send(get(path))
        while b"\r\n" not in connection.buffer and connection._fill():
            pass
        assert connection.buffer.split(b"\r\n", 1)[0] == b"HTTP/1.1 201 Created"
        response = connection.read_response()
        assert response is not None and (response.status, response.body) == (201, b"ok")
        assert response.header("Server") == "idemproxy"
    assert relay.access(path)["http.response.status_code"] == 201


def test_the_upstream_receives_the_clients_host(relay: Relay) -> None:
    """Default `host: preserve`: an absolute redirect built from Host points back through the
    proxy, not around it to the upstream's own address."""

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = relay.upstream.requests[-1].header("Host")
        writer.write(f"HTTP/1.1 302 Found\r\nLocation: http://{host}/next\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        await writer.drain()

    relay.upstream.scripts["/login"] = redirect
    response, connection = exchange(relay.proxy.port, get("/login", "shop.example:8443"))
    with connection:
        assert response is not None and response.status == 302
        assert response.header("Location") == "http://shop.example:8443/next"
    assert relay.upstream.requests[-1].all("Host") == ["shop.example:8443"]


def test_host_upstream_sends_the_upstreams_own_host(relay: Relay) -> None:
    response, connection = exchange(relay.proxy.port, get("/origin/x", "shop.example"))
    connection.close()
    assert response is not None and response.status == 200
    seen = relay.upstream.requests[-1]
    assert (seen.target, seen.all("Host")) == ("/origin/x", [f"127.0.0.1:{relay.upstream.port}"])
    assert seen.header("X-Forwarded-Host") == "shop.example"


def test_an_unclaimed_exchange_ends_with_its_client(relay: Relay) -> None:
    """nginx's default (proxy_ignore_client_abort off): the upstream is not kept busy for a
    client that left, and the log does not claim bytes that were never delivered."""
    closed = threading.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the proxy closes the connection
        closed.set()

    relay.upstream.scripts["/hold"] = hold
    before = relay.upstream.count
    connection = RawConnection(relay.proxy.port)
    connection.send(get("/hold"))
    relay.upstream.wait_for(before + 1)
    left = time.monotonic()
    connection.close()
    assert closed.wait(5), "the upstream exchange outlived its client"
    assert time.monotonic() - left < 5  # the upstream timeout is 10 s
    line = relay.access("/hold")
    assert (line["http.response.status_code"], line["http.response.body.size"]) == (499, 0)
    assert line["error.type"] == "client_disconnect"


def test_a_claimed_exchange_completes_without_its_client(relay: Relay) -> None:
    """A request holding an idempotency claim runs on, so its record is stored: the retry of
    the key replays the answer and the upstream executed it once."""
    answer = threading.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.get_running_loop().run_in_executor(None, answer.wait, 5)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 4\r\n\r\ndone")
        await writer.drain()

    relay.upstream.scripts["/v1/charge"] = slow
    request = (b"POST /v1/charge HTTP/1.1\r\nHost: a\r\nIdempotency-Key: abort-1\r\n"
               b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    before = relay.upstream.count
    connection = RawConnection(relay.proxy.port)
    connection.send(request)
    relay.upstream.wait_for(before + 1)
    connection.close()
    answer.set()

    def replayed() -> bool:
        response, again = exchange(relay.proxy.port, request)
        again.close()
        return response is not None and (response.status, response.body) == (201, b"done")

    wait_until(replayed, 5, "the replay of the stored answer")
    executed = [r for r in relay.upstream.requests if r.target == "/v1/charge"]
    assert len(executed) == 1
