"""Retry policy around `Upstream.send`: safe by default.

A request is sent again only when doing so cannot execute it twice:
- the body is absent or buffered (`bytes`; a streamed body cannot be replayed);
- the method is safe (GET, HEAD, OPTIONS): retried on every failure class in `retries.on`;
- any other method only with an idempotency claim (`ctx.idempotency_outcome == "miss"`) and
  only when nothing was sent (connect refused, ...), whatever `on` says: an ambiguous failure
  or an answered 5xx may already have executed it.
Attempts are spaced by fully jittered exponential backoff and share one deadline, the upstream
`timeout` counted from the first attempt (so an idempotency lease, derived from that timeout,
outlives every attempt), and are limited by a budget: requests retrying at once may be
at most `budget` of the upstream's requests in progress (at least `min_concurrent`).
"""

from __future__ import annotations

import asyncio
import random

from proxy.config import SAFE_METHODS, Retries
from proxy.http.context import Exchange, Payload, RequestContext
from proxy.http.headers import Headers
from proxy.upstream.targets import CircuitOpen, Upstream
from proxy.upstream.transport import UpstreamError, UpstreamResponse


def backoff(attempt: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] before retry `attempt`."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def exchange(upstream: Upstream, policy: Retries | None) -> Exchange:
    async def once(
        ctx: RequestContext, method: str, target: str, headers: Headers, body: Payload
    ) -> UpstreamResponse:
        return await upstream.send(method, target, headers, body)

    if policy is None or policy.attempts < 2:
        return once
    on = set(policy.on)
    statuses = frozenset(s for s in on if isinstance(s, int))
    deadline = upstream.config.timeout

    def allowed(attempt: int, delay: float, started: float, counted: bool) -> bool:
        if attempt >= policy.attempts:
            return False
        if asyncio.get_running_loop().time() + delay - started >= deadline:
            return False
        # A request already retrying holds its place in the budget.
        return counted or upstream.retrying < max(
            policy.min_concurrent, policy.budget * upstream.inflight
        )

    async def with_retries(
        ctx: RequestContext, method: str, target: str, headers: Headers, body: Payload
    ) -> UpstreamResponse:
        safe = method in SAFE_METHODS
        if not (body is None or isinstance(body, bytes)) or not (
            safe or ctx.idempotency_outcome == "miss"
        ):
            return await upstream.send(method, target, headers, body)
        started = asyncio.get_running_loop().time()
        ends = started + deadline
        attempt = 1
        counted = False
        try:
            while True:
                delay = backoff(attempt, policy.backoff, policy.max_backoff)
                try:
                    response = await upstream.send(method, target, headers, body, ends)
                except CircuitOpen:
                    raise
                except UpstreamError as exc:
                    kind = "ambiguous" if exc.sent else "not_sent"
                    if kind not in on or (exc.sent and not safe):
                        raise
                    if not allowed(attempt, delay, started, counted):
                        raise
                else:
                    if not (safe and response.status in statuses):
                        return response
                    if not allowed(attempt, delay, started, counted):
                        return response
                    response.release()
                if not counted:
                    counted = True
                    upstream.retrying += 1
                ctx.resend_count += 1
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            if counted:
                upstream.retrying -= 1

    return with_retries
