"""`upstreams.<name>`: targets, timeouts, health checks and the circuit breaker."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from proxy.config.fields import ErrorStatus, HttpUrl, Model
from proxy.config.units import Duration, PositiveDuration, Ratio


class HealthCheck(Model):
    path: str = "/healthz"
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    required: bool = True


class CircuitBreaker(Model):
    """Per target: open after `consecutive_failures` in a row, or when `failure_ratio` of at
    least `min_requests` outcomes within `window` failed; after `open_for`, let
    `half_open_requests` probes through; their success closes the circuit."""

    consecutive_failures: int | None = Field(default=5, ge=1)
    failure_ratio: Ratio | None = None
    window: Duration = 10.0
    min_requests: int = Field(default=20, ge=1)
    failure_statuses: list[ErrorStatus] = Field(default_factory=lambda: [502, 503, 504])
    open_for: Duration = 10.0
    half_open_requests: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _some_condition(self) -> CircuitBreaker:
        if self.consecutive_failures is None and self.failure_ratio is None:
            raise ValueError("set consecutive_failures or failure_ratio (or both)")
        if self.open_for <= 0 or self.window <= 0:
            raise ValueError("open_for and window must be above 0")
        return self


class Target(Model):
    url: HttpUrl
    weight: int = Field(default=1, ge=0)


class UpstreamHost(StrEnum):
    PRESERVE = "preserve"
    UPSTREAM = "upstream"


class Upstream(Model):
    url: HttpUrl | None = None
    targets: list[Target] | None = None
    connect_timeout: Duration = 2.0
    timeout: Duration = 30.0
    max_connections: int = Field(default=256, ge=1)
    # The one upstream client is the proxy's own (h1). The key stays only so that configs
    # saying `h1` keep loading; `aiohttp` was removed (docs/security/upstream.md).
    transport: str = "h1"
    # The Host the upstream receives: the client's (preserve, as sidecars such as Envoy do, so
    # that absolute redirects the upstream builds point back through the proxy) or the
    # upstream URL's own host:port (upstream).
    host: UpstreamHost = UpstreamHost.PRESERVE
    health: HealthCheck | None = None
    circuit_breaker: CircuitBreaker | None = None
    # Requests in progress beyond this are answered 503 `overloaded` at once (no queue).
    max_inflight: int | None = Field(default=None, ge=1)

    @field_validator("transport")
    @classmethod
    def _h1_only(cls, transport: str) -> str:
        if transport != "h1":
            raise ValueError(
                f"transport {transport!r} was removed: the proxy's own HTTP/1.1 client is the "
                "only upstream transport; delete this key (see docs/security/upstream.md)"
            )
        return transport

    @model_validator(mode="after")
    def _one_destination(self) -> Upstream:
        if (self.url is None) == (self.targets is None):
            raise ValueError("set exactly one of 'url' or 'targets'")
        if self.targets is not None and not any(t.weight for t in self.targets):
            raise ValueError("at least one target needs a weight above 0")
        return self

    @property
    def target_urls(self) -> list[str]:
        return [self.url] if self.url is not None else [t.url for t in self.targets or ()]
