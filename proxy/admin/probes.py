"""The /live, /ready and /health endpoints, read from the health monitor's cached state."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from proxy.admin.health import HealthMonitor
from proxy.http.response import Response
from proxy.pipeline.runtime import AdminHandler, Probe

HEALTH_JSON = "application/health+json"
_PROBE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

_TEXT = "text/plain; charset=utf-8"


def ready_text(checks: list[tuple[str, bool]], verbose: bool) -> tuple[int, str]:
    """Kubernetes healthz format: `ok`, or one `[+]name ok` / `[-]name failed` line per check."""
    passed = all(ok for _, ok in checks)
    if passed and not verbose:
        return 200, "ok"
    lines = [f"[+]{name} ok" if ok else f"[-]{name} failed: reason withheld" for name, ok in checks]
    lines.append("ready check passed" if passed else "ready check failed")
    return (200 if passed else 503), "\n".join(lines) + "\n"


def probes(monitor: HealthMonitor) -> dict[str, Probe]:
    """Path -> handler for the three probe endpoints (admin port, optionally the data port)."""

    async def live(query: str) -> Response:
        """200 while the main event loop turns; never looks at a dependency."""
        if not monitor.loop_turning():
            return _text(503, "event loop stalled\n")
        return _text(200, "ok")

    async def ready(query: str) -> Response:
        verbose = "verbose" in parse_qs(query, keep_blank_values=True)
        status, text = ready_text(list(monitor.readiness()), verbose)
        return _text(status, text)

    async def health(query: str) -> Response:
        document = monitor.report()
        return Response(
            status=503 if document["status"] == "fail" else 200,
            body=orjson.dumps(document),
            content_type=HEALTH_JSON,
            headers={"Cache-Control": "no-store"}.items(),
        )

    return {"/live": live, "/ready": ready, "/health": health}


def on_admin_port(probes: Mapping[str, Probe]) -> dict[str, AdminHandler]:
    """The probes as handlers of the admin port's aiohttp app."""
    return {path: _web(probe) for path, probe in probes.items()}


def _web(probe: Probe) -> AdminHandler:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        answer = await probe(request.query_string)
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    return handle


def _text(status: int, text: str) -> Response:
    return Response(status=status, body=text.encode(), content_type=_TEXT,
                    headers=_PROBE_HEADERS.items())
