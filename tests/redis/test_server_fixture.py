"""The redis-server fixture itself: a port taken between picking and binding is replaced."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.redis_server import RedisServer, ping


def test_a_port_taken_before_redis_binds_it_is_replaced(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
        try:
            assert server.port != taken
            assert ping(server.port)
        finally:
            server.stop()
