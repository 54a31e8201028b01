"""Scan proxy output for secrets: the canary values tests send, and shapes no log may contain.

Point it at any proxy_process log: `assert_no_secrets(process.stdout() + process.stderr())`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Values the tests put where clients put secrets; none may ever show up in proxy output.
AUTHORIZATION = "Bearer canary-authorization-7f3a9c"
COOKIE = "session=canary-cookie-51d2e8"
IDEMPOTENCY_KEY = "canary-idempotency-key-0b6e44"
QUERY = "token=canary-query-9a1c07"
CANARIES = (
    AUTHORIZATION.split()[1], COOKIE.split("=")[1], IDEMPOTENCY_KEY, QUERY.split("=")[1],
)


def secret_headers() -> bytes:
    """The secret-bearing request header lines, ready to splice into a raw request."""
    return (
        f"Authorization: {AUTHORIZATION}\r\nCookie: {COOKIE}\r\n"
        f"Idempotency-Key: {IDEMPOTENCY_KEY}\r\n"
    ).encode()


# Shapes of secrets whatever their value: credentials after an auth scheme, a logged header or
# field named like a secret, a query string attached to a logged path.
_SHAPES = re.compile(
    r"(?i)(\b(bearer|basic|digest)\s+[A-Za-z0-9._~+/=-]{6,}"
    r"|\"(authorization|cookie|set-cookie|proxy-authorization|idempotency-key)\"\s*:"
    r"|\b(authorization|cookie|idempotency-key)\s*[:=]\s*\S"
    r"|\"url\.(path|full)\"\s*:\s*\"[^\"]*\?)"
)


def find_secrets(text: str, canaries: Iterable[str] = CANARIES) -> list[str]:
    """Every line of `text` that carries a canary value or a secret's shape."""
    values = tuple(canaries)
    return [
        line
        for line in text.splitlines()
        if any(value in line for value in values) or _SHAPES.search(line)
    ]


def assert_no_secrets(text: str, canaries: Iterable[str] = CANARIES) -> None:
    leaks = find_secrets(text, canaries)
    assert not leaks, "secrets in proxy output:\n" + "\n".join(leaks[:20])
