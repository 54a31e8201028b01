"""Phase: take or mint the W3C trace id, and hand the upstream a child traceparent.

Not a stage of its own: it never waits, so the data plane calls `begin` before the pipeline and
`finish` after it, in its own frame (one coroutine less per request).

Precedence: a valid `traceparent`, else a valid `X-Trace-Id` (32 lowercase hex, or a UUID that
is normalised to it), else a new id. Invalid trace headers are never passed on; their names are
recorded in `ctx.trace_replaced` for the access log. Every response not yet sent gets
`X-Trace-Id`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from proxy.http.context import RequestContext
from proxy.http.response import StreamResponse

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
# The four fields every version starts with; version 00 has nothing after them, a later version
# may append fields after a dash (W3C Trace Context, "Versioning of traceparent").
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_V00_LENGTH = 55
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# W3C list member: key (simple or tenant@system) "=" value (printable ASCII, no ',' or '=').
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# Flags defined so far: 0x01 sampled, 0x02 random trace id; the rest must be sent as zero.
_KNOWN_FLAGS = 0x03
# What the proxy passes on: the spec asks to propagate at least 512 characters, and a longer
# list is cut by whole members, those over 128 characters first (W3C "Mutating the tracestate").
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
LONG_TRACESTATE_MEMBER = 128


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent_id, flags) from a valid traceparent, else None.

    Version 00 must be exactly its four fields. A higher version (not ff) is parsed by the
    same four fields and may carry more after a dash, which are ignored (W3C versioning rule).
    """
    if not value:
        return None
    value = value.strip(" \t")
    match = _TRACEPARENT.match(value)
    if match is None or match[1] == "ff":
        return None
    if len(value) != _V00_LENGTH and (match[1] == "00" or value[_V00_LENGTH] != "-"):
        return None
    if match[2] == _ZERO_TRACE or match[3] == _ZERO_SPAN:
        return None
    return match[2], match[3], match[4]


def parse_trace_id(value: str | None) -> str | None:
    """A 32-lowercase-hex trace id from X-Trace-Id; UUID form is accepted and normalised."""
    if not value:
        return None
    value = value.strip(" \t")
    if _UUID.match(value):
        value = value.replace("-", "").lower()
    if not _HEX32.match(value) or value == _ZERO_TRACE:
        return None
    return value


def parse_tracestate(values: Sequence[str]) -> str | None:
    """The tracestate to pass on, or None when there is none or it is invalid.

    Multiple header fields combine into one list (RFC 9110); empty members and whitespace
    around members are dropped. A malformed member, a key seen twice or more than 32 members
    make the whole list invalid (the W3C test suite discards it). A valid list longer than 512
    characters is shortened by whole members, never split: members over 128 characters go
    first, then members from the end.
    """
    members = [m.strip(" \t") for m in ",".join(values).split(",")]
    members = [m for m in members if m]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    keys = set()
    for member in members:
        if not _TRACESTATE_MEMBER.fullmatch(member):
            return None
        keys.add(member.partition("=")[0])
    if len(keys) != len(members):
        return None
    if len(",".join(members)) > MAX_TRACESTATE:
        members = _trimmed(members)
    return ",".join(members) or None


def _trimmed(members: list[str]) -> list[str]:
    kept = list(members)
    size = len(",".join(kept))
    for index in range(len(kept) - 1, -1, -1):
        if size <= MAX_TRACESTATE:
            break
        if len(kept[index]) > LONG_TRACESTATE_MEMBER:
            size -= len(kept.pop(index)) + 1
    while size > MAX_TRACESTATE:
        size -= len(kept.pop()) + 1
    return kept


def propagated_flags(flags: str) -> str:
    """The flags to send on: sampled and random kept, bits not defined yet cleared (W3C)."""
    return f"{int(flags, 16) & _KNOWN_FLAGS:02x}"


def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def begin(ctx: RequestContext, sample: Callable[[str], bool] | None = None) -> None:
    """Set the context's trace fields and the trace headers for the upstream. `sample` (set
    when spans are exported) decides the sampled flag of traces that start here; a continued
    trace keeps its parent's decision."""
    headers = ctx.request.headers
    replaced: list[str] = []
    raw_parents = headers.getall("traceparent", ())
    raw_id = headers.get("X-Trace-Id")
    # Two traceparent fields cannot both be the parent: the trace restarts (W3C).
    parent = parse_traceparent(raw_parents[0]) if len(raw_parents) == 1 else None
    if parent is not None:
        ctx.trace_id, ctx.parent_span_id, flags = parent
        ctx.trace_flags = propagated_flags(flags)
        if raw_id is not None and parse_trace_id(raw_id) != ctx.trace_id:
            replaced.append("x-trace-id")
        states = headers.getall("tracestate", ())
        if states:
            ctx.tracestate = parse_tracestate(states)
            if ctx.tracestate is None:
                replaced.append("tracestate")
    else:
        if raw_parents:
            replaced.append("traceparent")
        if "tracestate" in headers:
            replaced.append("tracestate")
        trace_id = parse_trace_id(raw_id)
        if trace_id is None:
            if raw_id is not None:
                replaced.append("x-trace-id")
            trace_id = new_trace_id()
        ctx.trace_id = trace_id
        if sample is not None:
            ctx.trace_flags = "01" if sample(trace_id) else "00"
    if replaced:
        ctx.trace_replaced = replaced
    ctx.span_id = new_span_id()
    outgoing = ctx.upstream_headers
    outgoing.append(("X-Trace-Id", ctx.trace_id))
    outgoing.append(("traceparent", f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.trace_flags}"))
    if ctx.tracestate is not None:
        outgoing.append(("tracestate", ctx.tracestate))


def finish(ctx: RequestContext, response: StreamResponse) -> None:
    """Every response not yet sent carries the trace id."""
    if not response.prepared:
        response.headers["X-Trace-Id"] = ctx.trace_id
