"""Span export (the `otel` extra): one SERVER span per sampled request, sent by OTLP/HTTP.

The request path only decides sampling (an integer compare on the trace id) and appends one
tuple to a bounded deque: no lock, no OpenTelemetry object, never a wait. A daemon thread turns
queued tuples into SDK `ReadableSpan`s and hands batches to the official OTLP exporter. When the
queue is full (the collector is down or slow) new spans are dropped and counted, so memory stays
bounded; a batch the exporter gives up on is counted as failed. The SDK's BatchSpanProcessor is
not used because it drops silently, with no count to alert on.

The span's id is the one the tracing stage sent upstream as the traceparent's parent id, and its
parent is the incoming traceparent's parent id, so client -> proxy -> upstream is one chain.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.config import SpanExport
from proxy.observability.instruments import Cell

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

# (trace_id, span_id, parent_id, flags, tracestate, start ns, end ns, status, access-log line)
SpanRecord = tuple[str, str, str, str, "str | None", int, int, int, dict[str, Any]]
_RATIO_SPACE = 1 << 64


def sampling_ratio(settings: SpanExport) -> float:
    if settings.sampling_ratio is not None:
        return settings.sampling_ratio
    try:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))
    except ValueError:
        return 1.0
    return min(1.0, max(0.0, ratio))


def ratio_sampler(ratio: float) -> Callable[[str], bool]:
    """OpenTelemetry's TraceIdRatioBased rule: the trace id's low 64 bits under the bound, so
    every service with the same ratio keeps the same traces."""
    bound = round(ratio * _RATIO_SPACE)
    return lambda trace_id: int(trace_id[16:], 16) < bound


class SpanSink:
    """The bounded queue and its export thread (one per process)."""

    def __init__(
        self,
        settings: SpanExport,
        exported: Cell,
        dropped: Cell,
        failed: Cell,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.sample = ratio_sampler(sampling_ratio(settings))
        self._settings = settings
        self._queue: deque[SpanRecord] = deque()
        self._limit = settings.max_queue_size
        self._batch = settings.max_export_batch_size
        self._exported, self._dropped, self._failed = exported, dropped, failed
        self._exporter = exporter or _otlp_exporter(settings)
        self._build = _SpanBuilder(settings)
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def offer(self, record: SpanRecord) -> None:
        """Called on the event loop: append or drop, never wait."""
        queue = self._queue
        if len(queue) >= self._limit:
            self._dropped.value += 1
            return
        queue.append(record)
        if len(queue) == self._batch:
            self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (within `timeout`) and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._exporter.shutdown()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._settings.schedule_delay)
            self._wake.clear()
            self._export_queued()
        self._export_queued()

    def _export_queued(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(len(queue), self._batch))]
            try:
                result = self._exporter.export([self._build(r) for r in batch])
            except Exception:  # the exporter's own failure must not end the thread
                result = SpanExportResult.FAILURE
            counter = self._exported if result is SpanExportResult.SUCCESS else self._failed
            counter.value += len(batch)


def _otlp_exporter(settings: SpanExport) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=str(settings.endpoint) if settings.endpoint is not None else None,
        headers=settings.headers,
        timeout=settings.export_timeout,
    )


class _SpanBuilder:
    """Turns a queued record into an SDK span (in the export thread)."""

    def __init__(self, settings: SpanExport) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        attributes: dict[str, str] = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        ):
            attributes["service.name"] = "idemproxy"
        self.resource = Resource.create({**attributes, **settings.resource_attributes})
        self.scope = InstrumentationScope("idemproxy", __version__)

    def __call__(self, record: SpanRecord) -> ReadableSpan:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
        from opentelemetry.trace.span import TraceState

        trace_hex, span_hex, parent_hex, flags, tracestate, start, end, status, line = record
        attributes = span_attributes(line)
        trace_id = int(trace_hex, 16)
        trace_flags = TraceFlags(int(flags, 16) & TraceFlags.SAMPLED)
        state = TraceState.from_header([tracestate]) if tracestate else TraceState()
        context = SpanContext(trace_id, int(span_hex, 16), False, trace_flags, state)
        parent = (
            SpanContext(trace_id, int(parent_hex, 16), True, trace_flags, state)
            if parent_hex
            else None
        )
        route = attributes.get("http.route")
        method = attributes.get("http.request.method") or "HTTP"
        return ReadableSpan(
            name=f"{method} {route}" if route else method,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            # Semantic conventions: a server span is an error for 5xx, not for 4xx.
            status=Status(StatusCode.ERROR) if status >= 500 else Status(StatusCode.UNSET),
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )


# Access-log fields exported as span attributes (OpenTelemetry names where one exists).
ATTRIBUTES = (
    "http.request.method", "url.path", "url.scheme", "http.route", "http.response.status_code",
    "server.address", "server.port", "network.protocol.version", "client.address",
    "user_agent.original", "error.type", "http.request.body.size", "http.response.body.size",
    "http.request.resend_count", "upstream.name", "upstream.target", "idempotency.outcome",
)


def span_attributes(line: dict[str, Any], keys: Sequence[str] = ATTRIBUTES) -> dict[str, Any]:
    """The access-log fields that are span attributes, without the empty ones."""
    return {key: line[key] for key in keys if line.get(key) is not None}
