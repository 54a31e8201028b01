"""`routes[]`: what a route matches and its idempotency, quota and retry settings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_validator,
)

from proxy.config.fields import TOKEN_RE, HeaderName, Method, Model
from proxy.config.units import Duration, Rate, Ratio, Size

# RFC 3986 unreserved characters and '/': a prefix spelled only with these has one spelling that
# every server agrees on, so no encoding of a request path can reach it by another name.
_PREFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")


class Match(Model):
    path_prefix: str = "/"
    methods: list[Method] | None = None
    # Compare the path case-insensitively: for an upstream that serves /V1/Payments as
    # /v1/payments, so that spelling cannot walk past this route's protections.
    ignore_case: bool = False

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, prefix: str) -> str:
        if not prefix.startswith("/"):
            raise ValueError(f"path_prefix must start with '/', got {prefix!r}")
        if not set(prefix) <= _PREFIX_CHARS:
            raise ValueError(
                f"path_prefix may contain only A-Z a-z 0-9 - . _ ~ and '/', got {prefix!r} "
                "(request paths are matched decoded; see docs/security/paths.md)"
            )
        segments = prefix.split("/")[1:-1]
        if "" in segments or "." in segments or ".." in segments or prefix.endswith(("/.", "/..")):
            raise ValueError(
                f"path_prefix must be in normal form (no '//', '.' or '..' segments), "
                f"got {prefix!r}"
            )
        return prefix


class Scope(Model):
    header: HeaderName


class Idempotency(Model):
    enabled: bool = False
    required: bool = False
    ttl: Duration = 86400.0
    methods: list[Method] = Field(default_factory=lambda: ["POST", "PATCH"])
    scope: Scope | None = None
    on_concurrent: Literal["reject", "wait"] = "reject"
    wait_timeout: Duration = 10.0
    # A key whose outcome is unknown (timeout or reset after sending, a holder that died) is
    # held indeterminate for `ttl` (never run again); `release_after_lease` runs the retry once
    # the lease is over, for upstreams that deduplicate on the forwarded key themselves.
    on_indeterminate: Literal["hold", "release_after_lease"] = "hold"
    max_body: Size = 1024 * 1024
    store_5xx: bool = False
    replay_headers: list[HeaderName] = Field(default_factory=list)


class QuotaKeySource(StrEnum):
    CLIENT_IP = "client_ip"
    HEADER = "header"


@dataclass(frozen=True, slots=True)
class QuotaKey:
    """Whose quota a request spends, parsed once at load from `client_ip` or `header:<Name>`
    (a request without that header spends its client address's quota)."""

    source: QuotaKeySource
    header: str | None = None  # set exactly when source is HEADER

    def __str__(self) -> str:  # the YAML spelling, for `idemproxy check` and the config hash
        return self.source if self.header is None else f"{self.source}:{self.header}"


def parse_quota_key(value: object) -> QuotaKey:
    if isinstance(value, QuotaKey):
        return value
    if value == QuotaKeySource.CLIENT_IP:
        return QuotaKey(QuotaKeySource.CLIENT_IP)
    if isinstance(value, str):
        source, separator, header = value.partition(":")
        if source == QuotaKeySource.HEADER and separator and TOKEN_RE.match(header):
            return QuotaKey(QuotaKeySource.HEADER, header)
    raise ValueError(f"quota key must be 'client_ip' or 'header:<Name>', got {value!r}")


QuotaKeyField = Annotated[
    QuotaKey, PlainValidator(parse_quota_key), PlainSerializer(str, return_type=str)
]


class Quota(Model):
    key: QuotaKeyField = QuotaKey(QuotaKeySource.CLIENT_IP)
    rate: Rate
    burst: int = Field(default=1, ge=1)
    # A quota store failure admits the request by default: quotas protect capacity, they are
    # not a correctness guarantee like idempotency (whose default is store.on_error).
    on_error: Literal["fail_closed", "fail_open"] = "fail_open"


# Methods a retry can never make execute twice (RFC 9110 §9.2.1 safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def _retry_on(value: object) -> object:
    if value in ("not_sent", "ambiguous") or (
        isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599
    ):
        return value
    raise ValueError(f"expected not_sent, ambiguous or a status 400-599, got {value!r}")


RetryOn = Annotated[str | int, BeforeValidator(_retry_on)]
_NOT_SENT: list[str | int] = ["not_sent"]


class Retries(Model):
    """Off unless present. `attempts` counts the first try. Safe methods (GET, HEAD, OPTIONS,
    TRACE) without a body and without an idempotency claim retry on everything in `on`; other
    requests only when nothing was sent, and then only safe methods or claimed requests
    (proxy.upstream.retry)."""

    attempts: int = Field(default=2, ge=1, le=10)
    backoff: Duration = 0.025
    max_backoff: Duration = 0.25
    budget: Ratio = 0.2
    min_concurrent: int = Field(default=3, ge=0)
    on: list[RetryOn] = Field(default_factory=lambda: _NOT_SENT.copy())

    @model_validator(mode="after")
    def _backoff_order(self) -> Retries:
        if self.max_backoff < self.backoff:
            raise ValueError("max_backoff must not be below backoff")
        return self


class Route(Model):
    name: str = Field(min_length=1)
    match: Match = Match()
    upstream: str
    idempotency: Idempotency = Idempotency()
    quota: Quota | None = None
    retries: Retries | None = None
