"""The /live, /ready and /health endpoints, read from the health monitor's cached state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.admin.health import HealthMonitor

HEALTH_JSON = "application/health+json"
_PROBE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

Probe = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


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

    async def live(request: web.BaseRequest) -> web.Response:
        """200 while the main event loop turns; never looks at a dependency."""
        if not monitor.loop_turning():
            return web.Response(status=503, text="event loop stalled\n", headers=_PROBE_HEADERS)
        return web.Response(text="ok", headers=_PROBE_HEADERS)

    async def ready(request: web.BaseRequest) -> web.Response:
        verbose = "verbose" in request.query
        status, text = ready_text(list(monitor.readiness()), verbose)
        return web.Response(status=status, text=text, headers=_PROBE_HEADERS)

    async def health(request: web.BaseRequest) -> web.Response:
        document = monitor.report()
        return web.Response(
            status=503 if document["status"] == "fail" else 200,
            body=orjson.dumps(document),
            content_type=HEALTH_JSON,
            headers={"Cache-Control": "no-store"},
        )

    return {"/live": live, "/ready": ready, "/health": health}
