"""Stage: count requests in progress per upstream and shed load beyond `max_inflight`.

Excess requests get 503 `overloaded` at once instead of queueing behind the ones admitted, so
admitted requests keep their latency. `Upstream.inflight` feeds the retry budget and the
`idemproxy_inflight_requests` gauge.
"""

from __future__ import annotations

from proxy.http.context import Handler, RequestContext
from proxy.http.problem import ProblemType, problem, retry_after
from proxy.http.response import StreamResponse
from proxy.upstream.targets import Upstream

# A slot frees as soon as any request in progress finishes: try again in the shortest wait.
_RETRY_AFTER = (retry_after(1),)


def stage(next_handler: Handler, upstream: Upstream) -> Handler:
    limit = upstream.config.max_inflight

    async def admit(ctx: RequestContext) -> StreamResponse:
        if limit is not None and upstream.inflight >= limit:
            ctx.error_type = "overloaded"
            return problem(
                ProblemType.OVERLOADED,
                f"upstream {upstream.name!r} already has {limit} requests in progress",
                ctx.trace_id,
                _RETRY_AFTER,
            )
        upstream.inflight += 1
        try:
            return await next_handler(ctx)
        finally:
            upstream.inflight -= 1

    return admit
