"""RFC 9457 problem+json responses for errors the proxy produces itself."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from aiohttp import web

from proxy.http.headers import SERVER

TYPE_PREFIX = "urn:idemproxy:problem:"


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    trace_id: str,
    headers: Iterable[tuple[str, str]] = (),
) -> web.Response:
    """A problem+json response; `slug` is the stable part of `type` that clients may match on."""
    body = problem_body(status, slug, title, detail, trace_id)
    response = web.Response(status=status, body=body, content_type="application/problem+json")
    response.headers["X-Trace-Id"] = trace_id
    response.headers["Server"] = SERVER
    for name, value in headers:
        response.headers[name] = value
    return response


def problem_body(status: int, slug: str, title: str, detail: str, trace_id: str) -> bytes:
    return orjson.dumps(
        {
            "type": TYPE_PREFIX + slug,
            "title": title,
            "status": status,
            "detail": detail,
            "trace_id": trace_id,
        }
    )
