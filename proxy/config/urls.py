"""Showing URLs from the config without their credentials: the one function for it."""

from __future__ import annotations

from urllib.parse import urlsplit

MASK = "***"


def redact_url(url: str) -> str:
    """`url` with its whole userinfo (user and password) replaced by ***, for anything shown:
    problem details, /health, /metrics, reload answers, logs, `idemproxy check`.

    A password may itself contain `@` (so the host follows the last `@` of the authority), and
    a malformed one may contain `/`, `?` or `#`, which ends the authority early; then everything
    up to the last `@` in the URL is masked rather than risk showing part of it.
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return parts._replace(netloc=f"{MASK}@{parts.netloc.rpartition('@')[2]}").geturl()
    scheme, separator, rest = url.partition("://")
    if separator and "@" in rest:
        return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}"
    return url
