"""Async polling with a deadline, for tests whose event loop must keep running meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], timeout: float, what: str, step: float = 0.02
) -> T:
    """Await `probe` until it returns something truthy or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(step)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")
