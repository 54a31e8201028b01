"""Composition root: compiles a config into the request pipeline and builds the admin app.

The only module that knows the stage order:
tracing -> dispatch (limits, routing) -> per-route stages -> forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy import admission, forward, quota, retry, tracing
from proxy.config import Config, Route
from proxy.context import Handler, RequestContext
from proxy.headers import client_address
from proxy.idempotency import stage as idempotency
from proxy.idempotency.keys import KeyHasher
from proxy.problem import problem
from proxy.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from proxy.routing import RouteTable
from proxy.stores import Store, open_store
from proxy.upstreams import Upstream


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    config: Route
    handler: Handler


class Runtime:
    """Everything built from one config: upstream pools, the route table and the entry handler.

    A reload builds a new Runtime and swaps it in; requests keep the one they started with.
    The idempotency store outlives reloads: the server passes its one store to each Runtime
    (a Runtime built without one opens and owns its own). Pass the `previous` runtime so
    target health, circuit state and in-memory quota counters carry over.
    """

    def __init__(
        self, config: Config, store: Store | None = None, *, previous: Runtime | None = None
    ) -> None:
        self.config = config
        self._owns_store = store is None
        self.store = open_store(config.store) if store is None else store
        self.hasher = KeyHasher(config.logging.hash_salt)
        self.upstreams = {name: Upstream(name, cfg) for name, cfg in config.upstreams.items()}
        self.limiter: Limiter | None = None
        if previous is not None:
            self._inherit(previous)
        self.routes: RouteTable[CompiledRoute] = RouteTable(
            (r.match.path_prefix, r.match.methods, CompiledRoute(r, self._route_handler(r)))
            for r in config.routes
        )
        self.entry: Handler = tracing.stage(self._dispatch)

    def _route_handler(self, route: Route) -> Handler:
        config = self.config
        upstream = self.upstreams[route.upstream]
        handler = forward.handler(
            upstream,
            config.limits,
            config.trusted_proxies,
            retry.exchange(upstream, route.retries),
        )
        if route.idempotency.enabled:
            handler = idempotency.stage(
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
            handler = quota.stage(handler, route, self._quota_limiter())
        return handler

    def _quota_limiter(self) -> Limiter:
        store = self.config.store
        if self.limiter is None:
            self.limiter = (
                MemoryLimiter(store.max_records)
                if store.url.startswith("memory:")
                else RedisLimiter(store.url, store.timeout)
            )
        return self.limiter

    def _inherit(self, previous: Runtime) -> None:
        for name, upstream in self.upstreams.items():
            old = previous.upstreams.get(name)
            if old is not None:
                upstream.inherit(old)
        if isinstance(previous.limiter, MemoryLimiter) and self.config.store.url.startswith(
            "memory:"
        ):
            # Taken over: closing the previous runtime must not clear the counters.
            self.limiter, previous.limiter = previous.limiter, None

    async def _dispatch(self, ctx: RequestContext) -> web.StreamResponse:
        request = ctx.request
        limits = self.config.limits
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > limits.max_header_bytes:
            ctx.error_type = "request_headers_too_large"
            response = problem(
                431,
                "headers-too-large",
                "Request headers too large",
                f"the request headers take {header_bytes} bytes; the limit is "
                f"{limits.max_header_bytes}",
                ctx.trace_id,
            )
            response.force_close()
            return response
        length = request.content_length
        if length is not None and length > limits.max_request_body:
            ctx.error_type = "request_body_too_large"
            response = problem(
                413,
                "body-too-large",
                "Request body too large",
                f"Content-Length {length} exceeds the limit of {limits.max_request_body} bytes",
                ctx.trace_id,
            )
            response.force_close()
            return response
        route = self.routes.match(request.rel_url.raw_path, request.method)
        if route is None:
            ctx.error_type = "no_route"
            return problem(
                404,
                "no-route",
                "No route",
                f"no route matches {request.method} {request.rel_url.raw_path}",
                ctx.trace_id,
            )
        ctx.route = route.config
        return await route.handler(ctx)

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self._owns_store:
            await self.store.close()


class DataPlane:
    """The data-port request handler; `runtime` is replaced atomically on reload."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.runtime
        peer = request.remote or ""
        trusted = runtime.config.trusted_proxies
        client_ip = (
            client_address(peer, request.headers.getall("X-Forwarded-For", ()), trusted)
            if trusted
            else peer
        )
        return await runtime.entry(RequestContext(request, client_ip))


async def live(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def admin_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/live", live)
    return app
