"""Per-request context shared by the stages, and the handler type they compose."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from proxy.http.headers import Headers
from proxy.http.request import Request
from proxy.http.response import StreamResponse

if TYPE_CHECKING:
    from proxy.upstream.transport import UpstreamResponse


class UpstreamOutcome(StrEnum):
    """What the proxy knows about the upstream exchange (the outcome classes of design.md)."""

    NOT_SENT = "not_sent"  # no request byte left: the upstream never saw it
    ANSWERED = "answered"  # a whole response came back
    AMBIGUOUS = "ambiguous"  # it may have reached the upstream; nothing tells whether it ran


class IdempotencyOutcome(StrEnum):
    """The access log's `idempotency.outcome` and the `outcome` label of
    `idemproxy_idempotency_total`."""

    MISS = "miss"  # claimed: this request executes
    REPLAY = "replay"
    CONFLICT = "conflict"
    MISMATCH = "mismatch"
    BYPASS = "bypass"
    INDETERMINATE = "indeterminate"
    STORE_ERROR = "store_error"


class Decision(StrEnum):
    """What finalising a claimed idempotency record did (`decision` label of
    `idemproxy_idempotency_decisions_total`)."""

    COMPLETE = "complete"  # the answer is stored for replay: the request executed
    RELEASE = "release"  # deleted: not sent, or a "try again" answer; the retry runs
    INDETERMINATE = "indeterminate"  # it may have run: the key is held


class BodyTap(Protocol):
    """Receives a copy of the response as it streams to the client (used by idempotency)."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def feed(self, chunk: bytes) -> None: ...

    async def commit(self) -> None:
        """The whole response came from the upstream and only the last write to the client is
        left: make it durable first, so a retry sent the moment the client has it finds it."""
        ...


@dataclass(slots=True)
class RequestContext:
    """What one request carries through the stages; stages write, access_log reads."""

    request: Request
    client_ip: str
    start: float = field(default_factory=time.perf_counter)
    trace_id: str = ""
    span_id: str = ""
    # The incoming traceparent's parent id (the client's span), "" when the trace starts here.
    parent_span_id: str = ""
    trace_flags: str = "01"
    tracestate: str | None = None
    # Names of incoming trace headers that were invalid and replaced (for the access log).
    trace_replaced: list[str] | None = None
    # The normalised request path (proxy.http.path): what routing matched and the upstream gets.
    path: str = ""
    route_name: str | None = None  # the matched route's `name`
    # Set by idempotency when the request body was read up front to fingerprint it.
    body: bytes | None = None
    # Extra headers the stages add to the upstream request (trace context, ...).
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    # Extra headers the stages add to the client response (quota state, ...).
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    tap: BodyTap | None = None
    upstream_name: str | None = None
    # The `target` label (host:port) of the upstream target that answered or failed last.
    upstream_target: str | None = None
    upstream_duration: float | None = None
    upstream_outcome: UpstreamOutcome | None = None
    # How many times the request was sent again after a failed attempt (retry policy).
    resend_count: int = 0
    request_body_size: int = 0
    response_body_size: int = 0
    status: int = 0
    idempotency_outcome: IdempotencyOutcome | None = None
    idempotency_decision: Decision | None = None
    # The idempotency record id (route, scope and key hashed): the store's key for this request.
    idempotency_record: str = ""
    idempotency_key_hash: str | None = None
    user_hash: str | None = None
    error_type: str | None = None
    # Why reading the client's request failed (size, deadline, disconnect), when it did.
    request_error: Exception | None = None
    client_disconnected: bool = False
    # Set by the data plane while draining: the response must carry `Connection: close`.
    close_connection: bool = False


Handler = Callable[[RequestContext], Awaitable[StreamResponse]]

Payload = bytes | AsyncIterable[bytes] | None
Exchange = Callable[[RequestContext, str, str, Headers, Payload], Awaitable["UpstreamResponse"]]
"""Sends one request upstream (method, target, headers, body) and returns the response head;
the retry policy wraps `Upstream.send` in one of these."""
