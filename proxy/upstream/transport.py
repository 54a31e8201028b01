"""The upstream HTTP/1.1 client behind one small interface: send a head and a body, get a
response head and a body stream. Errors say whether any byte of the request may have left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

import aiohttp
from yarl import URL

from proxy.http.headers import Headers

CHUNK = 64 * 1024


class UpstreamError(Exception):
    """The exchange failed. `sent` is False only when no request byte reached the upstream."""

    sent = True
    status = 502
    # Seconds a client should wait before trying again, when the proxy knows (Retry-After).
    retry_after: float | None = None
    slug = "upstream-unreachable"
    title = "Upstream unreachable"

    @property
    def error_type(self) -> str:
        """The access log's `error.type`: the problem slug, in the log's snake_case."""
        return self.slug.replace("-", "_")


class UpstreamNotSent(UpstreamError):
    sent = False


class UpstreamTimeout(UpstreamError):
    status = 504
    slug = "upstream-timeout"
    title = "Upstream timed out"


class UpstreamConnectTimeout(UpstreamNotSent):
    status = 504
    slug = "upstream-connect-timeout"
    title = "Upstream connect timed out"


class UpstreamBroken(UpstreamError):
    slug = "upstream-bad-response"
    title = "Upstream response failed"


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: Headers
    content_length: int | None

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError subclasses on failure."""
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


class _AiohttpResponse:
    __slots__ = ("_response", "content_length", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: Headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
        ]
        te = response.headers.get("Transfer-Encoding")
        self.content_length = None if te else response.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(str(exc) or "timed out reading the response body") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(str(exc) or type(exc).__name__) from exc

    def release(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport:
    """One pooled keep-alive ClientSession per upstream target; never follows redirects."""

    def __init__(
        self, base_url: str, *, connect_timeout: float, timeout: float, max_connections: int
    ) -> None:
        self._base = base_url
        self._connect_timeout = connect_timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, force_close=False),
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        # aiohttp resends GET, HEAD, OPTIONS, TRACE, PUT and DELETE once when a reused
        # connection drops, keyed or not; it has no per-request rule, so never (the attribute
        # aiohttp's own test client clears). See proxy.upstream.resend.
        self._session._retry_connection = False

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        url = URL(self._base + target, encoded=True)
        options: dict[str, Any] = {}
        if deadline is not None:
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            options["timeout"] = aiohttp.ClientTimeout(
                total=left, sock_connect=min(left, self._connect_timeout)
            )
        try:
            response = await self._session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                **options,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamConnectTimeout(f"connect to {self._base} timed out") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamNotSent(f"cannot connect to {self._base}: {exc.os_error}") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"{self._base} did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(f"{self._base}: {exc or type(exc).__name__}") from exc
        return _AiohttpResponse(response)

    async def close(self) -> None:
        await self._session.close()
