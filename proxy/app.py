"""Composition root: compiles a config into the request pipeline and builds the admin app.

The only module that knows the stage order:
tracing -> access log -> dispatch (limits, routing) -> per-route stages -> forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy import forward, logsink, tracing
from proxy.access_log import AccessLog
from proxy.config import Config, Route
from proxy.context import Handler, RequestContext
from proxy.headers import client_address
from proxy.metrics import Metrics, process_metrics
from proxy.problem import problem
from proxy.routing import RouteTable
from proxy.upstreams import Upstream


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    config: Route
    handler: Handler


class Runtime:
    """Everything built from one config: upstream pools, the route table and the entry handler.

    A reload builds a new Runtime and swaps it in; requests keep the one they started with.
    """

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        log: logsink.LineWriter | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or process_metrics()
        self.metrics.compile(config)
        self.access_log = AccessLog(config.logging, self.metrics, log or logsink.STDOUT)
        self.upstreams = {name: Upstream(name, cfg) for name, cfg in config.upstreams.items()}
        self.routes: RouteTable[CompiledRoute] = RouteTable(
            (r.match.path_prefix, r.match.methods, CompiledRoute(r, self._route_handler(r)))
            for r in config.routes
        )
        self.entry: Handler = tracing.stage(self.access_log.stage(self._dispatch))

    def _route_handler(self, route: Route) -> Handler:
        config = self.config
        return forward.handler(
            self.upstreams[route.upstream], config.limits, config.trusted_proxies
        )

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

    def rejected(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Log and count a request the HTTP parser refused before the pipeline ran."""
        self.runtime.access_log.rejected(request, response)


async def live(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def admin_app(metrics: Metrics | None = None) -> web.Application:
    app = web.Application()
    app.router.add_get("/live", live)
    app.router.add_get("/metrics", (metrics or process_metrics()).handle)
    return app
