"""The admin port of a supervisor (`workers: N`): the fleet's probes, /metrics and actions.

The supervisor (proxy/server/supervisor.py) carries no data traffic; it answers here from what
its workers report over their private admin sockets: /live and /ready from the last poll,
/health and /metrics by asking every worker now, drain and reload by acting on the whole fleet,
the key actions by forwarding to the first worker that answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy import __version__
from proxy.admin import auth, keys
from proxy.admin.fleet_metrics import FleetMetrics
from proxy.admin.probes import HEALTH_JSON, ready_text
from proxy.config import Admin
from proxy.observability.events import iso_time
from proxy.pipeline.runtime import admin_app, same_origin_only

_STATUS_ORDER = {"pass": 0, "warn": 1, "fail": 2}


class Worker(keys.Worker, Protocol):
    """What the fleet admin reads of one worker slot (proxy/server/supervisor.py's Worker)."""

    @property
    def index(self) -> int: ...
    @property
    def process(self) -> asyncio.subprocess.Process | None: ...
    @property
    def live(self) -> bool: ...
    @property
    def ready(self) -> bool: ...
    @property
    def restarts(self) -> int: ...


class Supervised(Protocol):
    """What the fleet admin reads of the supervisor and the one thing it asks of it (drain)."""

    @property
    def workers(self) -> Sequence[Worker]: ...
    @property
    def restarts(self) -> int: ...
    @property
    def stop(self) -> asyncio.Event: ...
    def request_stop(self, trigger: str) -> None: ...


class FleetAdmin:
    """The supervisor's admin app; `metrics` holds each worker's last /metrics for the sum."""

    def __init__(self, supervisor: Supervised) -> None:
        self.supervisor = supervisor
        self.metrics = FleetMetrics()

    def app(self, admin: Admin, token: str | None) -> web.Application:
        probes = {"/live": self._live, "/ready": self._ready, "/health": self._health}
        actions = {
            "/admin/drain": same_origin_only(self._drain_action),
            "/admin/reload": same_origin_only(self._reload_action),
            **keys.forwarded(self.supervisor.workers),
        }
        # The workers' sockets need no token: only this process can reach them.
        return admin_app(probes, actions, self._metrics, auth.guard(admin, token))

    async def _live(self, request: web.BaseRequest) -> web.Response:
        """200 when every worker answered its own /live at the last poll (a worker being
        restarted does not, for a moment)."""
        down = [str(w.index) for w in self.supervisor.workers if not w.live]
        if down:
            return web.Response(status=503, text=f"workers not live: {', '.join(down)}\n")
        return web.Response(text="ok")

    async def _ready(self, request: web.BaseRequest) -> web.Response:
        checks = [(f"worker:{w.index}", w.live and w.ready) for w in self.supervisor.workers]
        checks.append(("shutdown", not self.supervisor.stop.is_set()))
        status, text = ready_text(checks, "verbose" in request.query)
        return web.Response(status=status, text=text)

    async def _health(self, request: web.BaseRequest) -> web.Response:
        answers = await asyncio.gather(*(w.ask("GET", "/health") for w in self.supervisor.workers))
        documents = [orjson.loads(a[1]) if a is not None else None for a in answers]
        document = fleet_health(self.supervisor.workers, documents, self.supervisor.stop.is_set())
        return web.Response(
            status=503 if document["status"] == "fail" else 200,
            body=orjson.dumps(document),
            content_type=HEALTH_JSON,
            headers={"Cache-Control": "no-store"},
        )

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        answers = await asyncio.gather(*(w.ask("GET", "/metrics") for w in self.supervisor.workers))
        for worker, answer in zip(self.supervisor.workers, answers, strict=True):
            if answer is not None and answer[0] == 200:
                self.metrics.observed(worker.index, answer[1].decode())
        registry = CollectorRegistry()
        registry.register(_Families([*self.metrics.merged(), *self._own_metrics()]))
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    def _own_metrics(self) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "idemproxy_workers",
                "Worker processes answering /live.",
                value=sum(w.live for w in self.supervisor.workers),
            ),
            CounterMetricFamily(
                "idemproxy_worker_restarts",
                "Workers restarted after an unexpected exit.",
                value=self.supervisor.restarts,
            ),
        ]

    async def _drain_action(self, request: web.BaseRequest) -> web.Response:
        self.supervisor.request_stop("admin")
        body = {"status": "draining", "since": iso_time(time.time())}
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")

    async def _reload_action(self, request: web.BaseRequest) -> web.Response:
        """Every worker reloads the file; 200 when all succeeded (or found it unchanged), 422
        when one refused it, 503 when one did not answer."""
        answers = await asyncio.gather(
            *(w.ask("POST", "/admin/reload") for w in self.supervisor.workers)
        )
        results = {
            str(w.index): orjson.loads(a[1]) if a is not None else None
            for w, a in zip(self.supervisor.workers, answers, strict=True)
        }
        if any(a is None for a in answers):
            status = 503
        else:
            status = max(a[0] for a in answers if a is not None)
        return web.Response(
            status=status, body=orjson.dumps({"workers": results}), content_type="application/json"
        )


class _Families:
    """A collector over metric families built for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def fleet_health(
    workers: Sequence[Worker], documents: list[dict[str, Any] | None], draining: bool
) -> dict[str, Any]:
    """The supervisor's application/health+json: one check per worker (its own status, `fail`
    when it did not answer) and each worker's whole document under `workers`."""
    now = iso_time(time.time())
    checks: dict[str, list[dict[str, Any]]] = {}
    statuses = ["fail" if draining else "pass"]
    for worker, document in zip(workers, documents, strict=True):
        status = document["status"] if document is not None else "fail"
        statuses.append(status)
        check: dict[str, Any] = {
            "status": status,
            "componentType": "system",
            "observedValue": worker.process.pid if worker.process is not None else None,
            "observedUnit": "pid",
            "time": now,
            "restarts": worker.restarts,
        }
        output = document.get("output") if document is not None else "not answering"
        if output:
            check["output"] = output
        checks[f"worker:{worker.index}"] = [check]
    checks["proxy:draining"] = [
        {"status": statuses[0], "componentType": "system", "observedValue": draining, "time": now}
    ]
    releases = {d.get("releaseId") for d in documents if d is not None}
    status = max(statuses, key=_STATUS_ORDER.__getitem__)
    return {
        "status": status,
        "version": __version__,
        "releaseId": releases.pop() if len(releases) == 1 else None,
        "description": f"idemproxy supervisor of {len(workers)} workers",
        "checks": checks,
        "workers": {str(w.index): d for w, d in zip(workers, documents, strict=True)},
    }
