"""Composition root: compiles a config into the request pipeline and builds the admin app.

The only module that knows the stage order:
tracing -> access log -> dispatch (limits, routing) -> per-route stages -> forward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.config import Config, Route, StoreKind
from proxy.http.context import Handler, RequestContext
from proxy.http.headers import client_address, untrusted_forwarding
from proxy.http.path import BadPath, normalise
from proxy.http.problem import ProblemType, problem
from proxy.http.request import Request
from proxy.http.request_checks import check_host, check_request
from proxy.http.response import Response, StreamResponse
from proxy.idempotency import stage as idempotency
from proxy.idempotency.keys import KeyHasher
from proxy.observability import logsink, tracing
from proxy.observability.access_log import AccessLog
from proxy.observability.metrics import Metrics, process_metrics
from proxy.observability.spans import SpanSink
from proxy.pipeline import admission, forward
from proxy.pipeline.routing import RouteTable, Spec
from proxy.quota import stage as quota
from proxy.quota.limiter import Limiter, MemoryLimiter
from proxy.stores import Store, open_store
from proxy.upstream import retry
from proxy.upstream.targets import Upstream


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str  # the config's, read per request without a pydantic attribute lookup
    handler: Handler


class Runtime:
    """Everything built from one config: upstream pools, the route table and the entry handler.

    A reload builds a new Runtime and swaps it in; requests keep the one they started with.
    The idempotency store outlives reloads: the server passes its one store to each Runtime
    (a Runtime built without one opens and owns its own). Pass the `previous` runtime so
    target health, circuit state and in-memory quota counters carry over.
    """

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        *,
        previous: Runtime | None = None,
        metrics: Metrics | None = None,
        log: logsink.LineWriter | None = None,
    ) -> None:
        self.config = config
        # Read per request: plain attributes, not pydantic ones (each of those is a lookup
        # through BaseModel.__getattr__'s slot, several times a plain attribute's cost).
        self.probes_on_data_port = config.health.on_data_port
        self.trusted_proxies = config.trusted_proxies
        self.max_header_bytes = config.limits.max_header_bytes
        self.max_request_body = config.limits.max_request_body
        self.metrics = metrics or process_metrics()
        self.metrics.compile(config)
        self.access_log = AccessLog(
            config.logging, self.metrics, log or logsink.STDOUT, config.limits.write_timeout
        )
        self.inflight = InFlight()
        self._owns_store = store is None
        self.store = open_store(config.store) if store is None else store
        self.hasher = KeyHasher(config.logging.hash_salt)
        self.upstreams = {
            name: Upstream(name, cfg, self.metrics) for name, cfg in config.upstreams.items()
        }
        self.untrusted_headers = untrusted_forwarding(config.forwarding.strip_headers)
        self.limiter: Limiter | None = None
        self.spans: SpanSink | None = None
        if previous is not None:
            self._inherit(previous)
        export = config.tracing.export
        if export is not None and self.spans is None:
            metrics = self.metrics
            self.spans = SpanSink(
                export, metrics.spans_exported, metrics.spans_dropped, metrics.spans_failed
            )
        self.access_log.spans = self.spans
        self.routes: RouteTable[CompiledRoute] = RouteTable(
            Spec(
                r.match.path_prefix,
                r.match.methods,
                CompiledRoute(r.name, self._route_handler(r)),
                r.match.ignore_case,
            )
            for r in config.routes
        )
        # Tracing is a phase the data plane runs around this (it never waits).
        self.sample = self.spans.sample if self.spans is not None else None
        self.entry: Handler = self.access_log.stage(self._dispatch)

    def _route_handler(self, route: Route) -> Handler:
        config = self.config
        upstream = self.upstreams[route.upstream]
        handler = forward.handler(
            upstream,
            config.limits,
            config.trusted_proxies,
            retry.exchange(upstream, route.retries),
            self.untrusted_headers,
        )
        if route.idempotency.enabled:
            handler = idempotency.IdempotencyStage(
                handler,
                route=route,
                store=self.store,
                store_config=config.store,
                limits=config.limits,
                hasher=self.hasher,
                lease=idempotency.lease_for(
                    config.upstreams[route.upstream].timeout, config.store.timeout
                ),
            )
        # Shedding sits outside idempotency: an overloaded request never claims a key.
        handler = admission.stage(handler, upstream)
        if route.quota is not None:
            handler = quota.stage(
                handler, route, self._quota_limiter(), self.metrics.store_errors
            )
        return handler

    def _quota_limiter(self) -> Limiter:
        store = self.config.store
        if self.limiter is None:
            if store.kind is StoreKind.MEMORY:
                self.limiter = MemoryLimiter(store.max_records)
            else:
                # Imported here: redis-py and what it loads are about 20 MiB of RSS that a
                # memory-store sidecar never needs.
                from proxy.quota.redis_limiter import RedisLimiter

                self.limiter = RedisLimiter(store.url, store.timeout)
        return self.limiter

    def _inherit(self, previous: Runtime) -> None:
        for name, upstream in self.upstreams.items():
            old = previous.upstreams.get(name)
            if old is not None:
                upstream.inherit(old)
        if (
            isinstance(previous.limiter, MemoryLimiter)
            and self.config.store.kind is StoreKind.MEMORY
        ):
            # Taken over: closing the previous runtime must not clear the counters.
            self.limiter, previous.limiter = previous.limiter, None
        if previous.config.tracing.export == self.config.tracing.export:
            self.spans, previous.spans = previous.spans, None  # queued spans go on

    def _dispatch(self, ctx: RequestContext) -> Awaitable[StreamResponse]:
        """The matched route's pipeline, started but not awaited here (one coroutine level
        less on every wake-up of the request), or the refusal before any route."""
        found = self._route(ctx)
        if isinstance(found, StreamResponse):
            return _answered(found)
        ctx.route_name = found.name
        return found.handler(ctx)

    def _route(self, ctx: RequestContext) -> CompiledRoute | StreamResponse:
        """The request's route, or the answer refusing it before any route runs."""
        request = ctx.request
        path = request.raw_path
        rejection = check_request(
            request.version,
            path,
            request.raw_headers,
            request.headers.getall("Transfer-Encoding", ()),
            self.max_header_bytes,
        ) or check_host(request.headers.get("Host"))
        if rejection is not None:
            ctx.error_type = rejection.error_type
            response = problem(rejection.problem, rejection.detail, ctx.trace_id)
            response.force_close()
            return response
        length = request.content_length
        if length is not None and length > self.max_request_body:
            ctx.error_type = "request_body_too_large"
            response = problem(
                ProblemType.BODY_TOO_LARGE,
                f"Content-Length {length} exceeds the limit of {self.max_request_body} bytes",
                ctx.trace_id,
            )
            response.force_close()
            return response
        try:
            path = normalise(path)
        except BadPath as exc:
            ctx.error_type = "bad_request"
            response = problem(ProblemType.BAD_PATH, str(exc), ctx.trace_id)
            response.force_close()  # like every refusal before routing: the body is unread
            return response
        # Routing, the fingerprint and the upstream all see this one spelling.
        ctx.path = path
        route = self.routes.match(path, request.method)
        if route is None:
            ctx.error_type = "no_route"
            return problem(
                ProblemType.NO_ROUTE,
                f"no route matches {request.method} {path}",
                ctx.trace_id,
            )
        return route

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.spans is not None:
            await asyncio.to_thread(self.spans.shutdown)
        if self._owns_store:
            await self.store.close()


async def _answered(response: StreamResponse) -> StreamResponse:
    return response


class InFlight:
    """Counts requests in progress and lets shutdown and reload wait for zero."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """True once nothing is in progress; False if `timeout` seconds passed first."""
        if self.count == 0:
            return True
        if self._idle is None or self._idle.is_set():
            self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


AdminHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# A health probe: takes the raw query string, answers on the admin port (proxy/admin/probes.py
# adapts it to aiohttp) and, with `health.on_data_port`, on the data port.
Probe = Callable[[str], Awaitable[Response]]


class DataPlane:
    """The data-port request handler; `runtime` is replaced atomically on reload.

    After `start_drain()` every response not yet started carries `Connection: close`, including
    those of requests already in progress. `probes` (path -> handler) answer on the data port
    too when the config says `health.on_data_port: true`.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.inflight = InFlight()
        self.draining = False
        self.probes: Mapping[str, Probe] = {}
        self._live: dict[int, RequestContext] = {}

    def start_drain(self) -> None:
        self.draining = True
        for ctx in self._live.values():
            ctx.close_connection = True

    async def __call__(self, request: Request) -> StreamResponse:
        runtime = self.runtime
        if runtime.probes_on_data_port and request.method in ("GET", "HEAD"):
            probe = self.probes.get(request.raw_path)
            if probe is not None:
                return await probe(request.query_string)
        peer = request.remote or ""
        trusted = runtime.trusted_proxies
        client_ip = (
            client_address(peer, request.headers.getall("X-Forwarded-For", ()), trusted)
            if trusted
            else peer
        )
        ctx = RequestContext(request, client_ip, close_connection=self.draining)
        key = id(ctx)
        self._live[key] = ctx
        self.inflight.enter()
        runtime.inflight.enter()
        tracing.begin(ctx, runtime.sample)
        try:
            response = await runtime.entry(ctx)
            tracing.finish(ctx, response)
        finally:
            runtime.inflight.leave()
            self.inflight.leave()
            del self._live[key]
        if ctx.close_connection and not response.prepared:
            response.force_close()
        return response

    def rejected(self, request: Request, response: StreamResponse) -> None:
        """Log and count a request the HTTP parser refused before the pipeline ran."""
        self.runtime.access_log.rejected(request, response)

    def connection_refused(self) -> None:
        self.runtime.metrics.connections_rejected.value += 1


async def _admin_post_only(request: web.Request) -> web.Response:
    """Every /admin/* path changes state: POST only (405 otherwise), unknown ones 404."""
    if request.method != "POST":
        return web.Response(
            status=405, text="405: /admin/* accepts POST only\n", headers={"Allow": "POST"}
        )
    return web.Response(status=404, text=f"404: no admin action {request.path}\n")


def same_origin_only(action: AdminHandler) -> AdminHandler:
    """Browsers send `Origin` on cross-site POSTs; curl, kubectl exec and preStop hooks do not.
    Refusing it keeps a web page from draining the proxy through a developer's localhost."""

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        if "Origin" in request.headers:
            return web.Response(status=403, text="403: admin actions refuse browser requests\n")
        return await action(request)

    return guarded


def admin_app(
    probes: Mapping[str, AdminHandler],
    actions: Mapping[str, AdminHandler],
    metrics: AdminHandler | None = None,
    middlewares: Iterable[Middleware] = (),
) -> web.Application:
    """The admin port: probes and /metrics (GET) and /admin/* actions (POST); `middlewares`
    wrap every route (the credential check, proxy/admin/auth.py)."""
    app = web.Application(middlewares=list(middlewares))
    for path, probe in probes.items():
        app.router.add_get(path, probe)
    app.router.add_get("/metrics", metrics or process_metrics().handle)
    for path, action in actions.items():
        app.router.add_post(path, action)
    app.router.add_route("*", "/admin/{tail:.*}", _admin_post_only)
    return app
