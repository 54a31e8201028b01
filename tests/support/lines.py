"""A LineWriter for tests: keeps log lines in memory instead of writing them to stdout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson


class Lines:
    """A LineWriter that keeps what it is given."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    def write(self, line: bytes, urgent: bool = False) -> None:
        self.raw.append(line)

    def json(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.raw]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Poll (with a deadline) until `count` lines were written; lines of a streamed response
        are written after the client has seen its end."""
        deadline = time.monotonic() + timeout
        while len(self.raw) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} log lines not written within {timeout}s: {self.raw}")
            await asyncio.sleep(0.01)
        return self.json()
