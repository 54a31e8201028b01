"""Terminal handler: send the request upstream, stream the answer back, map failures to problems."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from proxy.config import Limits, UpstreamHost
from proxy.http import body
from proxy.http.context import (
    Exchange,
    Handler,
    Payload,
    RequestContext,
    UpstreamOutcome,
)
from proxy.http.headers import (
    SERVER,
    TRACE_CONTEXT,
    UNTRUSTED_FORWARDING,
    ForwardingRules,
    Networks,
    relay_headers,
)
from proxy.http.problem import problem, retry_after
from proxy.http.request import Channel
from proxy.http.response import Response, StreamResponse, reason_for
from proxy.upstream.targets import Upstream, served_by
from proxy.upstream.transport import UpstreamBroken, UpstreamError, UpstreamResponse

# Expect is answered by the proxy itself; the upstream never sees it.
_NOT_FORWARDED = TRACE_CONTEXT | {"expect"}


# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ); anything else (a CTL)
# would split or corrupt the head the client receives.
_BAD_REASON = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The one idempotency outcome under which the upstream exchange must run to completion (its
# response is being stored), whatever the client does.
_CLAIMED = "miss"
# Read per response as a global: an enum class attribute costs a call on Python 3.11
# (EnumType.__getattr__'s slot; docs/performance.md).
_ANSWERED = UpstreamOutcome.ANSWERED


def handler(
    upstream: Upstream,
    limits: Limits,
    trusted: Networks,
    send: Exchange,
    untrusted: frozenset[str] = UNTRUSTED_FORWARDING,
) -> Handler:
    """`send` is `upstream.send` wrapped by the route's retry policy (see proxy.upstream.retry);
    `untrusted` names the headers removed unless the peer is a trusted proxy."""

    rules = ForwardingRules(trusted, _NOT_FORWARDED, untrusted)  # once per route, not per request
    preserve_host = upstream.config.host is UpstreamHost.PRESERVE
    write_timeout, max_body, body_timeout = (
        limits.write_timeout, limits.max_request_body, limits.body_timeout
    )

    async def forward(ctx: RequestContext) -> StreamResponse:
        request = ctx.request
        ctx.upstream_name = upstream.name
        host = request.headers.get("Host")
        headers = rules.apply(request.headers.items(), peer=request.remote, host=host)
        headers.extend(ctx.upstream_headers)
        if preserve_host and host:
            headers.append(("Host", host))  # the transport sends it instead of its own
        payload: Payload = None
        if ctx.body is not None:
            payload = ctx.body
        elif request.body_exists:
            payload = body.stream(ctx, max_body, body_timeout)
            if request.content_length is not None:
                headers.append(("Content-Length", str(request.content_length)))
        query = request.query_string
        target = f"{ctx.path}?{query}" if query else ctx.path
        started = time.perf_counter()
        abortable = ctx.idempotency_outcome != _CLAIMED
        if abortable:
            request.on_lost = _aborter(ctx)
        try:
            response = await send(ctx, request.method, target, headers, payload)
            ctx.upstream_duration = time.perf_counter() - started
            ctx.upstream_target = served_by(response)
            ctx.upstream_outcome = _ANSWERED
            return await _relay(ctx, response, write_timeout)
        except UpstreamError as exc:
            ctx.upstream_duration = time.perf_counter() - started
            ctx.upstream_target = exc.target
            return _failed(ctx, exc)
        except asyncio.CancelledError:
            if ctx.upstream_outcome is None and ctx.client_disconnected:
                ctx.upstream_duration = time.perf_counter() - started
                ctx.upstream_outcome = UpstreamOutcome.AMBIGUOUS  # it may have reached the upstream
            raise
        finally:
            if abortable:
                request.on_lost = None

    return forward


def _aborter(ctx: RequestContext) -> Callable[[], bool]:
    """What the server calls if the client goes away during an exchange nobody will store: the
    upstream exchange is cancelled (its connection closed: the server cancels the request's
    task when this returns True), as nginx does with proxy_ignore_client_abort off, instead of
    keeping the upstream busy for no one. A claimed request is left running so its outcome is
    recorded."""

    def abort() -> bool:
        if ctx.client_disconnected:
            return False
        ctx.client_disconnected = True
        ctx.error_type = ctx.error_type or "client_disconnect"
        return True

    return abort


def _failed(ctx: RequestContext, exc: UpstreamError) -> Response:
    if isinstance(ctx.request_error, body.BodyError):
        # The client's body failed: the upstream saw a truncated request and must not act on it.
        ctx.upstream_outcome = UpstreamOutcome.NOT_SENT
        return body_problem(ctx, ctx.request_error)
    ctx.upstream_outcome = UpstreamOutcome.AMBIGUOUS if exc.sent else UpstreamOutcome.NOT_SENT
    ctx.error_type = exc.error_type
    wait = exc.retry_after
    headers = () if wait is None else (retry_after(wait),)
    return problem(exc.problem, str(exc), ctx.trace_id, headers)


def body_problem(ctx: RequestContext, error: body.BodyError) -> Response:
    response = problem(error.problem, str(error), ctx.trace_id)
    response.force_close()
    return response


async def _relay(
    ctx: RequestContext, upstream: UpstreamResponse, write_timeout: float
) -> StreamResponse:
    relayed, bad_head = relay_headers(upstream.headers)
    if bad_head is not None:
        upstream.release()
        return _failed(ctx, UpstreamBroken(f"upstream response rejected: {bad_head}"))
    chunks: AsyncIterator[bytes] | None = None  # None: the whole body came at once
    first = upstream.whole_body()
    if first is None:
        chunks = upstream.chunks()
        try:
            # The first body bytes are read before any header goes out, so a malformed or
            # stalled start of the body still gets a clean problem answer, not a cut connection.
            first = await anext(chunks, b"")
        except UpstreamError as exc:
            upstream.release()
            return _failed(ctx, exc)
    reason = upstream.reason
    if _BAD_REASON.search(reason):
        # The reason phrase carries no meaning (RFC 9112 §4: clients ignore it): the status's
        # standard phrase replaces an unsendable one, and the status is relayed as it came.
        reason = reason_for(upstream.status)
    # No Content-Type is invented for an untyped body (RFC 9110 §8.3 leaves sniffing or
    # assuming one to the recipient).
    response = StreamResponse(status=upstream.status, reason=reason, headers=relayed)
    headers = response.headers
    if ctx.response_headers:
        headers.extend(ctx.response_headers)
    headers["X-Trace-Id"] = ctx.trace_id
    headers.setdefault("Server", SERVER)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    if ctx.close_connection:
        response.force_close()
    ctx.status = upstream.status
    tap = ctx.tap
    if tap is not None:
        tap.start(upstream.status, relayed)
    if chunks is None or not first or len(first) == upstream.content_length:
        # The whole body is here: head and body leave in one write, under one deadline (or
        # none, when the write cannot wait for the client).
        upstream.release()  # read to the end: back to the pool, not held over the commit
        if tap is not None:
            if first:
                tap.feed(first)
            await tap.commit()  # before the response leaves (see BodyTap.commit)
        channel = ctx.request.channel
        if channel is None:
            raise RuntimeError("the response needs the request's connection")
        data = response.encode_whole(ctx.request, first)
        if _sends_at_once(channel, len(data)):
            # Nothing to wait for: written here, without a coroutine or a deadline.
            sent = _write_now(ctx, channel, data)
        else:
            sent = await _deliver(ctx, _send(channel, data), write_timeout)
        if sent:
            ctx.response_body_size = len(first)
        return response
    writing = await _deliver(ctx, response.prepare(ctx.request), write_timeout)
    try:
        chunk = first
        received = 0  # from the upstream; ctx.response_body_size counts what the client took
        while chunk:
            received += len(chunk)
            if tap is not None:
                tap.feed(chunk)
                if received == upstream.content_length:
                    await tap.commit()  # the last byte waits for the record (BodyTap.commit)
            if writing:
                writing = await _deliver(ctx, response.write(chunk), write_timeout)
                if writing:
                    # Counted once handed over: body.size is what the client was sent.
                    ctx.response_body_size += len(chunk)
            if not writing and tap is None:
                break
            chunk = await anext(chunks, b"")
        if tap is not None:
            await tap.commit()  # chunked (or cut short by the client): the terminator waits
        if writing:
            await _deliver(ctx, response.write_eof(), write_timeout)
    except UpstreamError as exc:
        # Headers are out: the only honest signal left is to cut the client connection.
        ctx.upstream_outcome = UpstreamOutcome.AMBIGUOUS
        ctx.error_type = exc.error_type
        _abort(ctx)
    finally:
        upstream.release()
    return response


async def _send(channel: Channel, data: bytes) -> None:
    channel.write(data)
    await channel.drain()


def _sends_at_once(channel: Channel, size: int) -> bool:
    """Whether `size` bytes reach the kernel without waiting for the client. asyncio's flow
    control makes a writer wait only while its transport holds more than the high-water mark, so
    with nothing held and `size` under the mark the send cannot block (and needs no deadline,
    whose timer costs more than the send on Python 3.11)."""
    transport = channel.transport
    return (
        transport is not None
        and not transport.get_write_buffer_size()
        and size <= transport.get_write_buffer_limits()[1]
    )


def _write_now(ctx: RequestContext, channel: Channel, data: bytes) -> bool:
    """Hand `data` to a channel that cannot make us wait (see _sends_at_once)."""
    try:
        channel.write(data)
    except (ConnectionError, OSError):
        ctx.client_disconnected = True
        return False
    return True


async def _deliver(
    ctx: RequestContext, sending: Awaitable[object], limit: float | None
) -> bool:
    """Send to the client within `limit` seconds; a client that stops reading is cut off."""
    try:
        if limit is None:
            await sending
        else:
            async with asyncio.timeout(limit):
                await sending
    except TimeoutError:
        ctx.client_disconnected = True
        ctx.error_type = "client_write_timeout"
        _abort(ctx)
        return False
    except (ConnectionError, OSError):
        ctx.client_disconnected = True
        return False
    return True


def _abort(ctx: RequestContext) -> None:
    """Reset the client connection now (headers are out, or the client stopped reading)."""
    channel = ctx.request.channel
    if channel is not None:
        channel.abort()
