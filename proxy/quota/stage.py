"""Stage: per-tenant quota (`routes[].quota`) with GCRA; 429 `quota-exceeded` when spent.

The tenant is the client address or a request header (a request without that header is
counted under its client address). Responses carry the IETF draft fields
(draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "<route>";q=<n>;w=<s>` and
`RateLimit: "<route>";r=<remaining>;t=<s>`; a 429 adds `Retry-After`.
"""

from __future__ import annotations

import hashlib
import math

from proxy.config import QuotaKeySource, Route
from proxy.http.context import Handler, RequestContext
from proxy.http.problem import ProblemType, problem, retry_after
from proxy.http.response import StreamResponse
from proxy.observability.instruments import Cell
from proxy.quota.limiter import Decision, Limiter, QuotaStoreError


def policy_header(name: str, rate: float, burst: int) -> str:
    """`q` requests per `w` whole seconds: the sustained rate, at least the burst."""
    window = max(1, math.ceil(burst / rate))
    quota = max(burst, math.floor(rate * window))
    return f"{_sf_string(name)};q={quota};w={window}"


def state_header(name: str, decision: Decision) -> str:
    wait = decision.retry_after if not decision.remaining else decision.reset
    return f"{_sf_string(name)};r={decision.remaining};t={math.ceil(wait)}"


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, with backslash and quote escaped."""
    text = "".join(c for c in value if " " <= c <= "~")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def storage_key(route: str, identity: str) -> str:
    """Tenant identities are hashed: Redis never holds raw addresses or tenant ids."""
    digest = hashlib.sha256(f"{route}\0{identity}".encode()).hexdigest()[:32]
    return f"quota:v1:{{{digest}}}"


def stage(next_handler: Handler, route: Route, limiter: Limiter, store_errors: Cell) -> Handler:
    """`store_errors` counts requests let through unlimited because the quota store failed (a
    fail_closed refusal is counted by the access log from its error type)."""
    quota = route.quota
    assert quota is not None
    header = quota.key.header if quota.key.source is QuotaKeySource.HEADER else None
    interval = 1.0 / quota.rate
    burst = quota.burst
    fail_open = quota.on_error == "fail_open"
    policy = policy_header(route.name, quota.rate, burst)

    async def limit(ctx: RequestContext) -> StreamResponse:
        tenant = ctx.request.headers.get(header) if header is not None else None
        identity = f"h:{tenant}" if tenant else f"ip:{ctx.client_ip}"
        try:
            decision = await limiter.acquire(storage_key(route.name, identity), interval, burst)
        except QuotaStoreError:  # the route's on_error decides; anything else is a bug: a 500
            if fail_open:
                store_errors.value += 1
                return await next_handler(ctx)
            ctx.error_type = "store_unavailable"
            return problem(
                ProblemType.QUOTA_STORE_UNAVAILABLE,
                "the quota store did not answer; the route is configured to fail closed",
                ctx.trace_id,
                (retry_after(1),),
            )
        headers = (("RateLimit-Policy", policy), ("RateLimit", state_header(route.name, decision)))
        if decision.allowed:
            ctx.response_headers.extend(headers)  # forward adds them to a streamed response
            response = await next_handler(ctx)
            if not response.prepared:
                response.headers.extend(headers)
            return response
        ctx.error_type = "quota_exceeded"
        return problem(
            ProblemType.QUOTA_EXCEEDED,
            f"the quota of route {route.name!r} allows {burst} requests at once and "
            f"{quota.rate:g} per second",
            ctx.trace_id,
            (*headers, retry_after(decision.retry_after)),
        )

    return limit
