"""Who answered a request and how: the bounded label values of the proxy-vs-upstream series.

Pure enums and one mapping, so the access log, the metrics and the span export agree.
"""

from __future__ import annotations

from enum import StrEnum


class ProxyReason(StrEnum):
    """Why the proxy answered a request itself instead of relaying the upstream's answer
    (`reason` of idemproxy_proxy_responses_total)."""

    REPLAY = "replay"  # the stored answer of an earlier request with the same Idempotency-Key
    CIRCUIT_OPEN = "circuit_open"  # 503: every target's circuit is open
    STORE_UNAVAILABLE = "store_unavailable"  # 503: the idempotency or quota store failed
    OVERLOAD = "overload"  # 503: upstreams.*.max_inflight reached
    QUOTA = "quota"  # 429: the route's quota is spent
    NO_ROUTE = "no_route"  # 404
    BAD_REQUEST = "bad_request"  # 400/413/414/431/408: the request was refused or incomplete
    IDEMPOTENCY = "idempotency"  # 409/422/428/400: the key is in use, reused or missing
    UPSTREAM_ERROR = "upstream_error"  # 502/504: the upstream failed before answering
    CLIENT_CLOSED = "client_closed"  # 499: the client left before an answer
    INTERNAL_ERROR = "internal_error"  # 500: a bug in the proxy
    OTHER = "other"


# error.type (see access_log) -> reason; types not listed fall back by prefix or status.
_REASONS = {
    "circuit_open": ProxyReason.CIRCUIT_OPEN,
    "store_unavailable": ProxyReason.STORE_UNAVAILABLE,
    "overloaded": ProxyReason.OVERLOAD,
    "quota_exceeded": ProxyReason.QUOTA,
    "no_route": ProxyReason.NO_ROUTE,
    "client_disconnect": ProxyReason.CLIENT_CLOSED,
    "cancelled": ProxyReason.CLIENT_CLOSED,
}
_REASON_PREFIXES = (
    ("upstream_", ProxyReason.UPSTREAM_ERROR),
    ("idempotency_", ProxyReason.IDEMPOTENCY),
    ("request_", ProxyReason.BAD_REQUEST),
)
# Read per answer, as a global: on Python 3.11 an enum class attribute is read through
# EnumType.__getattr__'s slot, a call (docs/performance.md, "Enum members and config fields").
_REPLAY = ProxyReason.REPLAY


def proxy_reason(error_type: str | None, status: int, replayed: bool) -> ProxyReason:
    """The reason of an answer the proxy made (not relayed from the upstream)."""
    if replayed:
        return _REPLAY
    if error_type is None:
        return ProxyReason.BAD_REQUEST if 400 <= status < 500 else ProxyReason.OTHER
    reason = _REASONS.get(error_type)
    if reason is not None:
        return reason
    for prefix, reason in _REASON_PREFIXES:
        if error_type.startswith(prefix):
            return reason
    if status == 500:
        return ProxyReason.INTERNAL_ERROR
    return ProxyReason.BAD_REQUEST if 400 <= status < 500 else ProxyReason.OTHER


class TargetOutcome(StrEnum):
    """`outcome` of idemproxy_upstream_requests_total: the status class of the answer, or how
    the attempt failed (nothing sent: safe to retry; ambiguous: the upstream may have acted)."""

    S2XX = "2xx"
    S3XX = "3xx"
    S4XX = "4xx"
    S5XX = "5xx"
    NOT_SENT = "not_sent"
    AMBIGUOUS = "ambiguous"


STATUS_OUTCOMES = {
    2: TargetOutcome.S2XX,
    3: TargetOutcome.S3XX,
    4: TargetOutcome.S4XX,
    5: TargetOutcome.S5XX,
}
