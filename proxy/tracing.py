"""Stage: take or mint the W3C trace id, and hand the upstream a child traceparent."""

from __future__ import annotations

import random
import re

from aiohttp import web

from proxy.context import Handler, RequestContext

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
MAX_TRACESTATE = 512


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent_id, flags) from a valid version-00 traceparent, else None."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip())
    if not match or match[1] == _ZERO_TRACE or match[2] == _ZERO_SPAN:
        return None
    return match[1], match[2], match[3]


def parse_trace_id(value: str | None) -> str | None:
    """A 32-lowercase-hex trace id from X-Trace-Id; UUID form is accepted and normalised."""
    if not value:
        return None
    value = value.strip()
    if _UUID.match(value):
        value = value.replace("-", "").lower()
    if not _HEX32.match(value) or value == _ZERO_TRACE:
        return None
    return value


def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def stage(next_handler: Handler) -> Handler:
    async def handle(ctx: RequestContext) -> web.StreamResponse:
        headers = ctx.request.headers
        parent = parse_traceparent(headers.get("traceparent"))
        if parent is not None:
            ctx.trace_id, _, ctx.trace_flags = parent
            tracestate = headers.get("tracestate")
            if tracestate and len(tracestate) <= MAX_TRACESTATE:
                ctx.tracestate = tracestate
        else:
            ctx.trace_id = parse_trace_id(headers.get("X-Trace-Id")) or new_trace_id()
        ctx.span_id = new_span_id()
        outgoing = ctx.upstream_headers
        outgoing.append(("X-Trace-Id", ctx.trace_id))
        outgoing.append(("traceparent", f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.trace_flags}"))
        if ctx.tracestate is not None:
            outgoing.append(("tracestate", ctx.tracestate))
        return await next_handler(ctx)

    return handle
