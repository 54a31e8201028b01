"""The YAML config. Each concern lives in its own module; the names the rest of the proxy uses
are re-exported here so that `from proxy.config import X` is the one way in:

units (durations, sizes, rates) · fields (shared field types) · env (${VAR} expansion) ·
errors (ConfigError, YAML paths) · models_upstream / models_route / models (the pydantic
models) · load (YAML in, cross-checks, `Config` out) · store_url · urls (redaction).
"""

from proxy.config.errors import ConfigError, format_path
from proxy.config.load import DEFAULT_PATH, config_hash, load, loads, parse, read_text
from proxy.config.models import (
    DEFAULT_STORE_MAX_BYTES,
    OTEL_MODULES,
    Admin,
    Config,
    Forwarding,
    Health,
    Limits,
    Listen,
    Logging,
    Reload,
    Shutdown,
    SpanExport,
    Store,
    Tracing,
    available_cpus,
    loopback_only,
)
from proxy.config.models_route import (
    SAFE_METHODS,
    Idempotency,
    Match,
    Quota,
    QuotaKey,
    QuotaKeySource,
    Retries,
    Route,
    Scope,
)
from proxy.config.models_upstream import CircuitBreaker, HealthCheck, Target, Upstream, UpstreamHost
from proxy.config.store_url import StoreKind
from proxy.config.units import (
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_ratio,
    parse_size,
)

__all__ = [
    "DEFAULT_PATH",
    "DEFAULT_STORE_MAX_BYTES",
    "OTEL_MODULES",
    "SAFE_METHODS",
    "Admin",
    "CircuitBreaker",
    "Config",
    "ConfigError",
    "Forwarding",
    "Health",
    "HealthCheck",
    "Idempotency",
    "Limits",
    "Listen",
    "Logging",
    "Match",
    "Quota",
    "QuotaKey",
    "QuotaKeySource",
    "Reload",
    "Retries",
    "Route",
    "Scope",
    "Shutdown",
    "SpanExport",
    "Store",
    "StoreKind",
    "Target",
    "Tracing",
    "Upstream",
    "UpstreamHost",
    "available_cpus",
    "config_hash",
    "format_duration",
    "format_path",
    "format_rate",
    "format_size",
    "load",
    "loads",
    "loopback_only",
    "parse",
    "parse_duration",
    "parse_rate",
    "parse_ratio",
    "parse_size",
    "read_text",
]
