"""The admin port's credential: a bearer token for everything but the probes and /metrics.

The token is read once at start (`load_token`) from `admin.token_file` or the variable named by
`admin.token_env`; `guard` turns it into an aiohttp middleware for the admin app. Every path is
guarded except OPEN_PATHS, so an action added under /admin/ later is covered without listing it.
Tokens are compared as SHA-256 digests with hmac.compare_digest: constant time, and the same
length whatever the client sends.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.admin.problem import problem
from proxy.config import Admin, ConfigError, loopback_only
from proxy.http.problem import ProblemType
from proxy.observability.events import emit
from proxy.observability.tracing import new_trace_id

# What the kubelet, load balancers and Prometheus read: open, and read-only.
OPEN_PATHS = frozenset({"/live", "/ready", "/health", "/metrics"})
MIN_TOKEN_LENGTH = 16
# RFC 6750 b64token: what a client can send after `Bearer ` unquoted.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_REALM = 'Bearer realm="idemproxy-admin"'


class Refusal(StrEnum):
    MISSING = "missing"  # no Authorization header, another scheme, or more than one
    INVALID = "invalid"  # a bearer token that is not the admin token


def load_token(admin: Admin, env: Mapping[str, str] | None = None) -> str | None:
    """The configured token, or None when none is configured (or `token_env` names an unset
    variable). Raises ConfigError naming the YAML path when the file cannot be read, the token
    is malformed, or the admin port is reachable from elsewhere and no token was found."""
    env = os.environ if env is None else env
    token: str | None = None
    if admin.token_file is not None:
        try:
            token = Path(admin.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                [f"admin.token_file: cannot read {admin.token_file}: {reason}"]
            ) from None
        _check("admin.token_file", token)
    elif admin.token_env is not None:
        token = env.get(admin.token_env, "").strip() or None
        if token is not None:
            _check("admin.token_env", token)
        elif not (loopback_only(admin.host) or admin.allow_unauthenticated):
            raise ConfigError([
                f"admin.token_env: environment variable {admin.token_env} is not set or empty, "
                f"and admin.host {admin.host or '(all interfaces)'} is reachable from other "
                "machines: refusing to serve the admin actions without a token"
            ])
    return token


def _check(where: str, token: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH or not _TOKEN_RE.match(token):
        raise ConfigError([
            f"{where}: the token must be at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 "
            "- . _ ~ + / (generate one with `openssl rand -hex 32`)"
        ])


def guard(admin: Admin, token: str | None) -> list[Middleware]:
    """The admin app's middlewares for this token: none without one (then a non-loopback
    listener is reported at start, since anyone who reaches it may drain the proxy)."""
    if token is None:
        if not loopback_only(admin.host):
            emit(
                "admin_unauthenticated",
                "warning",
                host=admin.host,
                port=admin.port,
                detail="admin.allow_unauthenticated: anyone who can reach the admin port can "
                "drain or reload this proxy; set admin.token_file or admin.token_env",
            )
        return []
    return [bearer_middleware(token)]


def bearer_middleware(token: str) -> Middleware:
    expected = hashlib.sha256(token.encode()).digest()

    @web.middleware
    async def require_bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        values = request.headers.getall("Authorization", ())
        scheme, _, credentials = values[0].partition(" ") if len(values) == 1 else ("", "", "")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return _refuse(request, Refusal.MISSING, _REALM)
        offered = hashlib.sha256(credentials.encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(offered, expected):
            return _refuse(request, Refusal.INVALID, f'{_REALM}, error="invalid_token"')
        return await handler(request)

    return require_bearer


def _refuse(request: web.Request, reason: Refusal, challenge: str) -> web.Response:
    trace_id = new_trace_id()
    emit(
        "admin_unauthorized",
        "warning",
        method=request.method,
        path=request.path,
        remote=request.remote,
        reason=reason,
        trace_id=trace_id,
    )
    detail = (
        "send the admin token as `Authorization: Bearer <token>` (admin.token_file or "
        "admin.token_env); probes and /metrics need none"
        if reason is Refusal.MISSING
        else "the bearer token does not match the admin token"
    )
    return problem(
        ProblemType.ADMIN_UNAUTHORIZED,
        detail,
        trace_id,
        [("WWW-Authenticate", challenge)],
    )
