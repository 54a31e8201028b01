"""Redis memory per idempotency record, and its overhead beyond the bytes the record stores.

    .venv/bin/python -m bench.record_memory [--records 100000] [--body 1024]

Starts its own `redis-server` (no persistence), writes N completed records through the Redis
store itself (claim, then complete, as the proxy does: storage keys, tokens, fingerprints and
holder of the real shapes, the bench upstream's response headers, a body of `--body` bytes),
and reads `INFO memory` `used_memory` before and after. Prints per record: the memory used, the
bytes the record stores (its key, token, fingerprint, holder, status, headers and body), and
the overhead, the difference. A run of 100,000 records takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import socket
import tempfile
from pathlib import Path

import orjson

from bench.harness import Lab
from proxy.redis.resp import RespClient
from proxy.stores.base import Lease, StoredResponse
from proxy.stores.redis import RedisStore, redis_key

HEADERS = (("Content-Type", "application/json"), ("Content-Length", "1024"))
CONCURRENCY = 64
WARM_UP = 1000


async def used_memory(client: RespClient) -> int:
    info: bytes = await client.execute("INFO", "memory")
    line = next(x for x in info.split(b"\r\n") if x.startswith(b"used_memory:"))
    return int(line.split(b":")[1])


async def fill(port: int, records: range, body: bytes) -> int:
    """Writes the records; returns the bytes they store."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", 5.0)
    lease = Lease(33.0, 86400.0, True, f"{socket.gethostname()}/{12345}")
    response = StoredResponse(200, HEADERS, body, True)
    payload = len(orjson.dumps(HEADERS)) + len(body) + len(str(response.status))
    stored = 0
    queue = iter(records)

    async def worker() -> None:
        nonlocal stored
        for i in queue:
            key = hashlib.sha256(b"%d" % i).hexdigest()[:40]
            token = f"{random.getrandbits(128):032x}"
            fingerprint = hashlib.sha256(b"fp%d" % i).hexdigest()[:40]
            assert await store.claim(key, token, fingerprint, lease) is None
            assert await store.complete(key, token, response, lease.retention)
            stored += (len(redis_key(key)) + len(token) + len(fingerprint) + len(lease.holder)
                       + payload)

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        await store.close()
    return stored


async def measure(port: int, records: int, body: bytes) -> tuple[int, int]:
    """(used_memory growth, bytes stored) for `records` records."""
    client = RespClient("127.0.0.1", port, connect_timeout=5.0)
    try:
        # First the fixed costs (scripts loaded, connection buffers grown) out of the figure.
        await fill(port, range(records, records + WARM_UP), body)
        before = await used_memory(client)
        stored = await fill(port, range(records), body)
        return await used_memory(client) - before, stored
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--body", type=int, default=1024, help="response body bytes")
    args = parser.parse_args()
    lab = Lab(Path(tempfile.mkdtemp(prefix="record-memory-")))
    try:
        redis = lab.redis(cpu=1)
        used, stored = asyncio.run(measure(redis.port, args.records, b"x" * args.body))
    finally:
        lab.stop_all()
    n = args.records
    content = args.body + len(orjson.dumps(HEADERS))
    print(f"{n:,} records, {args.body} B body: {used / n:,.0f} B per record in Redis; "
          f"it stores {stored / n:,.0f} B (key, token, fingerprint, holder, status, headers, "
          f"body): overhead {(used - stored) / n:,.0f} B; beyond the response's headers and "
          f"body alone ({content} B): {used / n - content:,.0f} B")


if __name__ == "__main__":
    main()
