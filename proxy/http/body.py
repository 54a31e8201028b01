"""Reading the client's request body under the size limit and the body deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proxy.http.context import RequestContext
from proxy.http.problem import ProblemType
from proxy.http.request import HTTP_11, BodyFramingError

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyError(Exception):
    problem = ProblemType.BAD_REQUEST_BODY
    error_type = "request_body"


class TrailersTooLarge(BodyError):
    """Too many trailer fields, or one too long (the limits of header fields apply)."""

    problem = ProblemType.HEADERS_TOO_LARGE
    error_type = "request_headers_too_large"


class BodyTooLarge(BodyError):
    problem = ProblemType.BODY_TOO_LARGE
    error_type = "request_body_too_large"


class BodyTimeout(BodyError):
    problem = ProblemType.BODY_TIMEOUT
    error_type = "request_body_timeout"


class ClientGone(BodyError):
    problem = ProblemType.CLIENT_CLOSED
    error_type = "client_disconnect"


async def stream(ctx: RequestContext, max_size: int, timeout: float) -> AsyncIterator[bytes]:
    """Yield the request body as it arrives; raise BodyError subclasses on limit or deadline.

    The failure is also recorded on the context, because a body consumer such as the upstream
    client may wrap the exception in its own.
    """
    content = ctx.request.content
    if content is None:
        return
    _continue(ctx)
    deadline = None  # counted from the first read that can wait
    while True:
        try:
            if content.is_eof():
                # Everything has arrived (a small body comes with the head): reading cannot
                # wait, and a timer per read costs more than the read.
                chunk = await content.readany()
            else:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + timeout
                async with asyncio.timeout_at(deadline):
                    chunk = await content.readany()
        except TimeoutError:
            raise _fail(
                ctx, BodyTimeout(f"the request body did not arrive within {timeout:g}s")
            ) from None
        except BodyFramingError as exc:
            error: BodyError = (
                TrailersTooLarge(str(exc))
                if exc.problem is ProblemType.HEADERS_TOO_LARGE
                else BodyError(f"malformed request body: {exc}")
            )
            raise _fail(ctx, error) from exc
        except Exception as exc:
            transport = ctx.request.transport
            if transport is None or transport.is_closing():
                raise _fail(ctx, ClientGone("client disconnected during the request body")) from exc
            raise _fail(ctx, BodyError(f"malformed request body: {exc}")) from exc
        if not chunk:
            if not content.is_eof():
                raise _fail(ctx, ClientGone("client disconnected during the request body"))
            return
        yield _counted(ctx, chunk, max_size)


async def read(ctx: RequestContext, max_size: int, timeout: float) -> bytes:
    """The whole request body, bounded by `max_size` and `timeout`."""
    content = ctx.request.content
    if content is None:
        return b""
    if content.is_eof():
        # Everything arrived with the head (the usual small body): taken at once, without the
        # async generator that the loop would register, iterate and unregister.
        _continue(ctx)
        return _counted(ctx, content.take_all(), max_size)
    return b"".join([chunk async for chunk in stream(ctx, max_size, timeout)])


def _counted(ctx: RequestContext, chunk: bytes, max_size: int) -> bytes:
    """`chunk`, once added to the body's size; refused when the size passes `max_size`."""
    ctx.request_body_size += len(chunk)
    if ctx.request_body_size > max_size:
        raise _fail(ctx, BodyTooLarge(f"the request body exceeds {max_size} bytes"))
    return chunk


def _continue(ctx: RequestContext) -> None:
    """Answer `Expect: 100-continue` before the body is read."""
    request = ctx.request
    # RFC 9110 §10.1.1: an HTTP/1.0 client's 100-continue is ignored (it may not know 1xx).
    if (request.channel is not None and request.version >= HTTP_11
            and request.headers.get("Expect", "").lower() == "100-continue"):
        try:
            request.channel.write(_CONTINUE)
        except ConnectionError as exc:
            raise _fail(ctx, ClientGone("client disconnected before the request body")) from exc


def _fail(ctx: RequestContext, error: BodyError) -> BodyError:
    ctx.error_type = error.error_type
    ctx.request_error = error
    return error
