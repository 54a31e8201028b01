"""Stage: time the request, write its one access log line, and count it in the metrics.

Composed right after tracing so it wraps everything: the line is written on every outcome
(forwarded, upstream error, client gone, limits and 404 before routing, unexpected errors),
and `rejected` covers requests the HTTP parser refused before the pipeline ran. Values are
typed (numbers stay numbers); names follow OpenTelemetry. Never logged: Authorization, cookies,
raw idempotency keys, the query string (only `logging.query_allowlist` keys pass).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web

from proxy.config import Logging
from proxy.http.context import Handler, RequestContext
from proxy.http.problem import problem
from proxy.observability.events import emit, iso_time
from proxy.observability.logsink import LineWriter
from proxy.observability.metrics import OTHER_METHOD, Metrics

# Client-chosen strings are cut to this many characters; a log line stays bounded.
MAX_FIELD = 512
# error.type of requests the HTTP parser rejected, by the status the proxy answered.
_PARSER_ERRORS = {414: "uri_too_long", 431: "request_headers_too_large"}


def allowed_query(query: str, allow: frozenset[str]) -> str | None:
    """The parts of a raw query string whose (decoded) key is allow-listed, else None."""
    if not query or not allow:
        return None
    kept = [part for part in query.split("&") if unquote_plus(part.split("=", 1)[0]) in allow]
    return "&".join(kept)[:MAX_FIELD] if kept else None


def encode(line: dict[str, Any]) -> bytes:
    """One JSON line. Strings with undecodable bytes (surrogate escapes) are shown escaped."""
    try:
        return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        clean = {
            key: value.encode("utf-8", "backslashreplace").decode()
            if isinstance(value, str)
            else value
            for key, value in line.items()
        }
        return orjson.dumps(clean, option=orjson.OPT_APPEND_NEWLINE)


def _bounded(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD else value[:MAX_FIELD]


class AccessLog:
    """The access log and request metrics for one runtime's settings."""

    def __init__(self, settings: Logging, metrics: Metrics, sink: LineWriter) -> None:
        self.enabled = settings.access_log
        self.allow = frozenset(settings.query_allowlist)
        self.metrics = metrics
        self.sink = sink

    def stage(self, next_handler: Handler) -> Handler:
        inflight = self.metrics.inflight

        async def handle(ctx: RequestContext) -> web.StreamResponse:
            inflight.value += 1
            response: web.StreamResponse | None = None
            try:
                response = await next_handler(ctx)
                return response
            except asyncio.CancelledError:
                ctx.error_type = ctx.error_type or "cancelled"
                raise
            except web.HTTPException as exc:  # aiohttp's raise-a-response idiom: it is the answer
                exc.headers["X-Trace-Id"] = ctx.trace_id
                response = exc
                raise
            except Exception as exc:
                ctx.error_type = ctx.error_type or type(exc).__name__
                emit(
                    "unhandled_error",
                    "error",
                    trace_id=ctx.trace_id,
                    error=repr(exc)[:MAX_FIELD],
                    traceback="".join(traceback.format_exception(exc)),
                )
                if ctx.status:  # the response has begun: nothing else can be sent
                    raise
                response = problem(
                    500,
                    "internal-error",
                    "Internal proxy error",
                    "the proxy failed while handling this request",
                    ctx.trace_id,
                )
                return response
            finally:
                inflight.value -= 1
                self._finish(ctx, response)

        return handle

    def _finish(self, ctx: RequestContext, response: web.StreamResponse | None) -> None:
        if response is None:
            status = ctx.status or 499
            size = ctx.response_body_size
        else:
            status = response.status
            size = ctx.response_body_size if response.prepared else (response.content_length or 0)
        request = ctx.request
        self.record(ctx, status, size, request.method, request.rel_url.raw_path)

    def rejected(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Log and count a request the HTTP parser refused (method and path are unknown)."""
        ctx = RequestContext(request, request.remote or "")
        ctx.trace_id = response.headers.get("X-Trace-Id", "")
        ctx.error_type = _PARSER_ERRORS.get(response.status, "malformed_request")
        self.record(ctx, response.status, response.content_length or 0, None, None)

    def record(
        self,
        ctx: RequestContext,
        status: int,
        response_size: int,
        method: str | None,
        path: str | None,
    ) -> None:
        seconds = time.perf_counter() - ctx.start
        route = ctx.route.name if ctx.route is not None else None
        metrics = self.metrics
        route_metrics = metrics.route(route)
        route_metrics.request(method or OTHER_METHOD, status, seconds)
        upstream_seconds = ctx.upstream_duration
        if upstream_seconds is not None and ctx.upstream_name is not None:
            metrics.upstream(ctx.upstream_name).observe(upstream_seconds)
        outcome = ctx.idempotency_outcome
        if outcome is not None:
            route_metrics.idempotency(outcome)
        decision = ctx.idempotency_decision
        if decision is not None:
            route_metrics.decision(decision)
        error_type = ctx.error_type
        if error_type == "store_unavailable" or outcome == "store_error":
            metrics.store_errors.value += 1
        if not self.enabled:
            return
        if error_type is None:
            if ctx.client_disconnected:
                error_type = "client_disconnect"
            elif status >= 500:
                error_type = str(status)
        headers = ctx.request.headers
        self.sink.write(
            encode(
                {
                    "timestamp": iso_time(time.time() - seconds),
                    "trace_id": ctx.trace_id,
                    "span_id": ctx.span_id or None,
                    "trace_flags": ctx.trace_flags,
                    "http.request.method": _bounded(method),
                    "url.path": _bounded(path),
                    "url.query": allowed_query(ctx.request.rel_url.raw_query_string, self.allow)
                    if self.allow and path is not None
                    else None,
                    "http.route": route,
                    "http.response.status_code": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "upstream.duration_ms": None
                    if upstream_seconds is None
                    else round(upstream_seconds * 1000, 3),
                    "upstream.name": ctx.upstream_name,
                    "client.address": ctx.client_ip or None,
                    "user_agent.original": _bounded(headers.get("User-Agent")),
                    "http.request.header.x-request-id": _bounded(headers.get("X-Request-Id")),
                    "http.request.body.size": ctx.request_body_size,
                    "http.response.body.size": response_size,
                    "idempotency.outcome": outcome,
                    "idempotency.key_hash": ctx.idempotency_key_hash,
                    "user.hash": ctx.user_hash,
                    "error.type": error_type,
                    "trace.replaced": ctx.trace_replaced,
                }
            )
        )
