import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import BlockingConnectionPool, RedisCluster
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.redis.client import BlockingSentinelConnectionPool, close, connect
from proxy.stores import StoreError
from proxy.stores.base import Lease
from proxy.stores.redis import RedisStore
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer


async def test_clients_carry_the_budget_and_a_blocking_pool() -> None:
    standalone = connect("redis://127.0.0.1:1/0", 0.2)
    pool = standalone.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    assert pool.timeout == 0.2
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.2, 0.2)
    assert kwargs["retry"].get_retries() == 1
    await close(standalone)
    sentinel = connect("redis+sentinel://127.0.0.1:1/mymaster/0", 0.2)
    assert isinstance(sentinel.connection_pool, BlockingSentinelConnectionPool)
    assert sentinel.connection_pool.timeout == 0.2
    await close(sentinel)
    cluster = connect("redis+cluster://127.0.0.1:1", 0.2)
    assert isinstance(cluster, RedisCluster)
    await close(cluster)


async def test_a_stalled_redis_costs_one_budget_not_redis_py_defaults(
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = redis_server()
    client = connect(redis.url, 0.2)
    try:
        await client.ping()
        redis.stall()
        started = time.perf_counter()
        with pytest.raises(RedisTimeoutError):
            await client.get("x")
        assert time.perf_counter() - started < 2  # redis-py 8 defaults: about 60 s
    finally:
        redis.resume()
        await close(client)


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


async def test_rediss_verifies_the_server_certificate(
    redis_server: Callable[..., RedisServer], tls_cert: tuple[Path, Path]
) -> None:
    cert, key = tls_cert
    tls_port = free_port()
    redis_server("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                 "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                 "--tls-auth-clients", "no")
    trusted = RedisStore.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", 2.0)
    untrusted = RedisStore.from_url(f"rediss://127.0.0.1:{tls_port}/0", 2.0)
    try:
        assert await trusted.claim("k", "t", "fp", Lease(5, 60)) is None
        with pytest.raises(StoreError):
            await untrusted.claim("k2", "t", "fp", Lease(5, 60))
    finally:
        await trusted.close()
        await untrusted.close()
