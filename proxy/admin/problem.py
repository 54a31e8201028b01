"""Problem+json answers on the admin port (an aiohttp app), from the one catalogue."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from proxy.http.problem import ProblemType, problem_body, problem_headers


def problem(
    kind: ProblemType, detail: str, trace_id: str, headers: Iterable[tuple[str, str]] = ()
) -> web.Response:
    return web.Response(
        status=kind.status,
        body=problem_body(kind, detail, trace_id),
        headers=problem_headers(trace_id, headers),
    )
