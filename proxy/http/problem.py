"""RFC 9457 problem+json responses for errors the proxy produces itself, and their catalogue.

`ProblemType` is the one list of every problem the proxy answers: status, the stable slug
clients match on (`type` is `urn:idemproxy:problem:<slug>`), the title, and whether the answer
tells the client when to try again (`Retry-After`). docs/http.md's table is checked against it
(tests/http/test_problem_catalogue.py), so a new type cannot ship undocumented.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum

import orjson

from proxy.http.headers import SERVER
from proxy.http.response import Response

TYPE_PREFIX = "urn:idemproxy:problem:"
CONTENT_TYPE = "application/problem+json"


class ProblemType(Enum):
    """(status, slug, title, retry_after): `retry_after` means the answer carries Retry-After."""

    # Before routing: the request itself (the connection is closed after these).
    BAD_REQUEST = (400, "bad-request", "Malformed request", False)
    BAD_TRANSFER_ENCODING = (400, "bad-transfer-encoding", "Unsupported Transfer-Encoding", False)
    BAD_HEADER_NAME = (400, "bad-header-name", "Invalid header name", False)
    BAD_REQUEST_TARGET = (400, "bad-request-target", "Unsupported request target", False)
    BAD_PATH = (400, "bad-path", "Bad request path", False)
    BAD_HOST = (400, "bad-host", "Bad Host header", False)
    URI_TOO_LONG = (414, "uri-too-long", "Request line too long", False)
    HEADERS_TOO_LARGE = (431, "headers-too-large", "Request headers too large", False)
    HTTP_VERSION_NOT_SUPPORTED = (
        505, "http-version-not-supported", "HTTP version not supported", False
    )
    TOO_MANY_CONNECTIONS = (503, "too-many-connections", "Too many connections", True)
    NO_ROUTE = (404, "no-route", "No route", False)
    # The request body.
    BAD_REQUEST_BODY = (400, "bad-request-body", "Bad request body", False)
    BODY_TOO_LARGE = (413, "body-too-large", "Request body too large", False)
    BODY_TIMEOUT = (408, "body-timeout", "Request body timed out", False)
    CLIENT_CLOSED = (499, "client-closed", "Client closed the connection", False)
    JSON_TOO_DEEP = (400, "json-too-deep", "JSON body too deep", False)
    # Protection of the upstream.
    QUOTA_EXCEEDED = (429, "quota-exceeded", "Quota exceeded", True)
    QUOTA_STORE_UNAVAILABLE = (503, "quota-store-unavailable", "Quota store unavailable", True)
    OVERLOADED = (503, "overloaded", "Upstream overloaded", True)
    CIRCUIT_OPEN = (503, "circuit-open", "Circuit open", True)
    # Idempotency.
    KEY_MISSING = (400, "key-missing", "Idempotency-Key required", False)
    KEY_INVALID = (400, "key-invalid", "Malformed Idempotency-Key", False)
    PAYLOAD_MISMATCH = (422, "payload-mismatch", "Idempotency-Key reused", False)
    IN_PROGRESS = (409, "in-progress", "Request in progress", True)
    OUTCOME_INDETERMINATE = (409, "outcome-indeterminate", "Outcome unknown", False)
    RESPONSE_NOT_REPLAYABLE = (422, "response-not-replayable", "Response not replayable", False)
    STORE_UNAVAILABLE = (503, "store-unavailable", "Idempotency store unavailable", True)
    # The upstream exchange.
    UPSTREAM_UNREACHABLE = (502, "upstream-unreachable", "Upstream unreachable", False)
    UPSTREAM_BAD_RESPONSE = (502, "upstream-bad-response", "Upstream response failed", False)
    UPSTREAM_CONNECT_TIMEOUT = (
        504, "upstream-connect-timeout", "Upstream connect timed out", False
    )
    UPSTREAM_TIMEOUT = (504, "upstream-timeout", "Upstream timed out", False)
    # The admin port.
    ADMIN_UNAUTHORIZED = (401, "admin-unauthorized", "Admin credential required", False)
    ADMIN_REQUEST_INVALID = (400, "admin-request-invalid", "Invalid admin request", False)
    ADMIN_ROUTE_UNKNOWN = (404, "admin-route-unknown", "Unknown route", False)
    ADMIN_KEY_NOT_FOUND = (404, "admin-key-not-found", "No record for this key", False)
    ADMIN_KEY_IN_FLIGHT = (409, "admin-key-in-flight", "Key still in flight", False)
    # A bug: logged as `unhandled_error` with the trace id.
    INTERNAL_ERROR = (500, "internal-error", "Internal proxy error", False)

    def __init__(self, status: int, slug: str, title: str, retry_after: bool) -> None:
        self.status = status
        self.slug = slug
        self.title = title
        self.retry_after = retry_after

    @property
    def error_type(self) -> str:
        """The access log's `error.type` for this problem: its slug in snake_case."""
        return self.slug.replace("-", "_")


def retry_after(seconds: float) -> tuple[str, str]:
    """The one way the proxy writes Retry-After: whole seconds, rounded up, at least 1."""
    return ("Retry-After", str(max(1, math.ceil(seconds))))


def problem(
    kind: ProblemType,
    detail: str,
    trace_id: str,
    headers: Iterable[tuple[str, str]] = (),
) -> Response:
    """A problem+json response of one catalogued type."""
    return Response(
        status=kind.status,
        body=problem_body(kind, detail, trace_id),
        headers=problem_headers(trace_id, headers),
    )


def problem_headers(
    trace_id: str, headers: Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """The headers of every problem answer (the data plane's and the admin port's)."""
    return {"Content-Type": CONTENT_TYPE, "X-Trace-Id": trace_id, "Server": SERVER, **dict(headers)}


def problem_body(kind: ProblemType, detail: str, trace_id: str) -> bytes:
    return orjson.dumps(
        {
            "type": TYPE_PREFIX + kind.slug,
            "title": kind.title,
            "status": kind.status,
            "detail": detail,
            "trace_id": trace_id,
        }
    )
