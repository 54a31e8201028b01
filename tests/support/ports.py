"""Free loopback ports and polling with a deadline (never a bare sleep as synchronisation)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, step: float = 0.02) -> T:
    """Call `probe` until it returns something truthy or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except Exception as exc:  # the thing is not up yet
            last_error = exc
        else:
            if result:
                return result
        time.sleep(step)
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last_error!r})")
