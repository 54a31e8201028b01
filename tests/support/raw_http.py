"""Send exact bytes to a server and read what comes back, for byte-level HTTP tests."""

from __future__ import annotations

import asyncio


async def exchange(
    port: int, data: bytes, timeout: float = 5.0, until_close: bool = False
) -> tuple[bytes, bool]:
    """Send `data`, read one response (or, with `until_close`, until the server closes or goes
    quiet for `timeout`); returns (bytes received, whether the server closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    closed = False
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                closed = True
                break
            received += chunk
            if not until_close and _complete(received):
                break
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    writer.close()
    return received, closed


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
