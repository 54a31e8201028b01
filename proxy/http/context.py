"""Per-request context shared by the stages, and the handler type they compose."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from proxy.http.headers import Headers

if TYPE_CHECKING:
    from proxy.config import Route
    from proxy.upstream.transport import UpstreamResponse


class BodyTap(Protocol):
    """Receives a copy of the response as it streams to the client (used by idempotency)."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def feed(self, chunk: bytes) -> None: ...


@dataclass(slots=True)
class RequestContext:
    """What one request carries through the stages; stages write, access_log reads."""

    request: web.BaseRequest
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
    route: Route | None = None
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
    # "not_sent" | "answered" | "ambiguous": what the proxy knows about the upstream exchange.
    upstream_outcome: str | None = None
    # How many times the request was sent again after a failed attempt (retry policy).
    resend_count: int = 0
    request_body_size: int = 0
    response_body_size: int = 0
    status: int = 0
    idempotency_outcome: str | None = None
    idempotency_key_hash: str | None = None
    user_hash: str | None = None
    error_type: str | None = None
    # Why reading the client's request failed (size, deadline, disconnect), when it did.
    request_error: Exception | None = None
    client_disconnected: bool = False
    # Set by the data plane while draining: the response must carry `Connection: close`.
    close_connection: bool = False


CLIENT_LOST: web.RequestKey[Callable[[], None]] = web.RequestKey("idemproxy_client_lost")
"""Request storage key of a callback the server calls when the client's connection is lost
while the request is being handled (forward sets it when the exchange may be aborted)."""

Handler = Callable[[RequestContext], Awaitable[web.StreamResponse]]

Payload = bytes | AsyncIterable[bytes] | None
Exchange = Callable[[RequestContext, str, str, Headers, Payload], Awaitable["UpstreamResponse"]]
"""Sends one request upstream (method, target, headers, body) and returns the response head;
the retry policy wraps `Upstream.send` in one of these."""
