"""Retry policy around `Upstream.send`: safe by default.

A request is sent again only when doing so cannot execute it twice:
- the body is absent or buffered (`bytes`; a streamed body cannot be replayed);
- after a failure that sent nothing (connect refused, ...): a safe method (GET, HEAD, OPTIONS,
  TRACE), or any method under an idempotency claim (the claim keeps the retry of the key out);
- after anything that may have reached the upstream (an ambiguous failure, an answered status in
  `retries.on`): only what `proxy.upstream.resend.may_repeat` allows, a safe method without a
  body and without an idempotency claim, whatever `on` says. A claimed request whose attempt may
  have reached the upstream ends ambiguous, and its key indeterminate.
Attempts are spaced by fully jittered exponential backoff and share one deadline, the upstream
`timeout` counted from the first attempt (so an idempotency lease, derived from that timeout,
outlives every attempt), and are limited by a budget: requests retrying at once may be
at most `budget` of the upstream's requests in progress (at least `min_concurrent`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable

from proxy.config import SAFE_METHODS, Retries
from proxy.http.context import (
    Exchange,
    IdempotencyOutcome,
    Payload,
    RequestContext,
    UpstreamOutcome,
)
from proxy.http.headers import Headers
from proxy.upstream.resend import may_repeat
from proxy.upstream.targets import CircuitOpen, Upstream
from proxy.upstream.transport import UpstreamError, UpstreamResponse


def backoff(attempt: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] before retry `attempt`."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def exchange(upstream: Upstream, policy: Retries | None) -> Exchange:
    def once(
        ctx: RequestContext, method: str, target: str, headers: Headers, body: Payload
    ) -> Awaitable[UpstreamResponse]:
        # Returns the attempt for the caller to await: no coroutine level of its own.
        return upstream.send(method, target, headers, body)

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
        claimed = ctx.idempotency_outcome == IdempotencyOutcome.MISS
        if not (body is None or isinstance(body, bytes)) or not (
            method in SAFE_METHODS or claimed
        ):
            return await upstream.send(method, target, headers, body)
        repeatable = may_repeat(method, body, claimed)
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
                    kind = UpstreamOutcome.AMBIGUOUS if exc.sent else UpstreamOutcome.NOT_SENT
                    if kind not in on or (exc.sent and not repeatable):
                        raise
                    if not allowed(attempt, delay, started, counted):
                        raise
                else:
                    if not (repeatable and response.status in statuses):
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
