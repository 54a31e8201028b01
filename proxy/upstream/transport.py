"""The upstream client's interface: send a head and a body, get a response head and a body
stream. Errors say whether any byte of the request may have left. The one implementation is
proxy.upstream.h1 (aiohttp's ClientSession was removed: it could not keep an upstream connection
to one response at a time)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from proxy.http.headers import Headers
from proxy.http.problem import ProblemType


class UpstreamError(Exception):
    """The exchange failed. `sent` is False only when no request byte reached the upstream."""

    sent = True
    problem = ProblemType.UPSTREAM_UNREACHABLE
    # Seconds a client should wait before trying again, when the proxy knows (Retry-After).
    retry_after: float | None = None
    # The target label (host:port) of the target that failed, when one was picked.
    target: str | None = None

    @property
    def error_type(self) -> str:
        """The access log's `error.type`: the problem slug, in the log's snake_case."""
        return self.problem.error_type


class UpstreamNotSent(UpstreamError):
    sent = False


class UpstreamTimeout(UpstreamError):
    problem = ProblemType.UPSTREAM_TIMEOUT


class UpstreamConnectTimeout(UpstreamNotSent):
    problem = ProblemType.UPSTREAM_CONNECT_TIMEOUT


class UpstreamBroken(UpstreamError):
    problem = ProblemType.UPSTREAM_BAD_RESPONSE


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: Headers
    content_length: int | None

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError subclasses on failure."""
        ...

    def whole_body(self) -> bytes | None:
        """The whole body when it has already arrived in one piece (taken: chunks() then
        yields nothing more), else None. Never waits, never fails."""
        ...

    def release(self) -> None:
        """Return the connection to the pool (body fully read) or close it (otherwise)."""
        ...


class Transport(Protocol):
    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """One exchange, ended by the upstream `timeout` or the earlier loop-time `deadline`
        (retries share their first attempt's deadline)."""
        ...

    async def close(self) -> None: ...
