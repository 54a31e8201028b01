"""Composition root: compiles a config into the request pipeline and builds the admin app.

The only module that knows the stage order:
tracing -> dispatch (limits, routing) -> per-route stages -> forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy import forward, tracing
from proxy.config import Config, Route
from proxy.context import Handler, RequestContext
from proxy.headers import client_address
from proxy.problem import problem
from proxy.request_checks import check_request
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

    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstreams = {name: Upstream(name, cfg) for name, cfg in config.upstreams.items()}
        self.routes: RouteTable[CompiledRoute] = RouteTable(
            (r.match.path_prefix, r.match.methods, CompiledRoute(r, self._route_handler(r)))
            for r in config.routes
        )
        self.entry: Handler = tracing.stage(self._dispatch)

    def _route_handler(self, route: Route) -> Handler:
        config = self.config
        return forward.handler(
            self.upstreams[route.upstream], config.limits, config.trusted_proxies
        )

    async def _dispatch(self, ctx: RequestContext) -> web.StreamResponse:
        request = ctx.request
        limits = self.config.limits
        path = request.rel_url.raw_path
        rejection = check_request(
            request.version,
            path,
            request.raw_headers,
            request.headers.getall("Transfer-Encoding", ()),
            limits.max_header_bytes,
        )
        if rejection is not None:
            ctx.error_type = rejection.error_type
            response = problem(
                rejection.status, rejection.slug, rejection.title, rejection.detail, ctx.trace_id
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
        route = self.routes.match(path, request.method)
        if route is None:
            ctx.error_type = "no_route"
            return problem(
                404,
                "no-route",
                "No route",
                f"no route matches {request.method} {path}",
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


async def live(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def admin_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/live", live)
    return app
