"""When a request that may already have reached the upstream may be sent again.

One rule for every layer that could resend (the HTTP/1.1 client after a stale keep-alive
connection, the retry policy after an ambiguous failure or a retryable status): only a request
that is safe by its method (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE), carries no body, and is
not under an idempotency claim. PUT and DELETE are idempotent, not safe: a second copy may still
act (on a resource changed in between), and a keyed request is exactly the one whose upstream does
not deduplicate (that is the proxy's job), so neither is ever resent. Go's net/http rule (resend
anything with an Idempotency-Key) exists for clients whose servers deduplicate.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

from proxy.config import SAFE_METHODS


def may_repeat(method: str, body: bytes | AsyncIterable[bytes] | None, claimed: bool) -> bool:
    """Whether sending this request a second time can never execute anything twice."""
    return method in SAFE_METHODS and not claimed and (body is None or body == b"")
