"""The YAML config: pydantic models, units, ${VAR} expansion, and errors that name the YAML path."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import types
import typing
from collections.abc import Hashable, Iterator, Mapping
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.config.store_url import parse_url
from proxy.config.urls import redact_url

DEFAULT_PATH = "config/proxy.yaml"
# Leaves room for the proxy itself (~51Mi idle) and a keyed 10MiB request body being
# fingerprinted in a sidecar limited to 128Mi (docs/security/memory-store.md).
DEFAULT_STORE_MAX_BYTES = 32 * 1024 * 1024

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PYDANTIC_STEP = re.compile(r"^[a-z][a-z-]*\[.*\]$")


class ConfigError(Exception):
    """One or more problems with a config file, each prefixed by its YAML path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: object) -> object:
    """`250ms`, `30s`, `5m`, `24h`, `7d` -> seconds; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 30s or 24h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match[1]) * _DURATION_UNITS[match[2]]
    raise ValueError(f"expected a duration like 250ms, 30s or 24h, got {value!r}")


def format_duration(seconds: float) -> str:
    for unit, factor in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds / factor)}{unit}"
    return f"{round(seconds * 1000, 3):g}ms"


def parse_size(value: object) -> object:
    """`1MiB`, `16KiB`, `10MB`, `512` (bytes) -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 16KiB or 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()])
    raise ValueError(f"expected a size like 16KiB or 10MiB, got {value!r}")


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_rate(value: object) -> object:
    """`100/s`, `600/m`, `1000/h` -> requests per second."""
    if isinstance(value, str):
        match = _RATE_RE.match(value)
        if match and float(match[1]) > 0:
            return float(match[1]) / _RATE_UNITS[match[2]]
    raise ValueError(f"expected a rate like 100/s, 600/m or 1000/h, got {value!r}")


def format_rate(per_second: float) -> str:
    return f"{per_second:g}/s"


def _method(value: object) -> object:
    if isinstance(value, str) and _TOKEN_RE.match(value):
        return value.upper()
    raise ValueError(f"not an HTTP method: {value!r}")


def _header_name(value: object) -> object:
    if isinstance(value, str) and _TOKEN_RE.match(value):
        return value
    raise ValueError(f"not a header name: {value!r}")


def _http_url(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("expected a URL like http://127.0.0.1:8080")
    parts = urlsplit(value)
    shown = redact_url(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {shown!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an upstream URL cannot have a query or fragment: {shown!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in URL {shown!r}") from None
    return value.rstrip("/")


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
# For intervals and probe timeouts, where zero would mean a busy loop or a check that cannot pass.
PositiveDuration = Annotated[Duration, Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
Deadline = Annotated[Duration, Field(gt=0)]
Rate = Annotated[float, BeforeValidator(parse_rate), PlainSerializer(format_rate)]
Method = Annotated[str, BeforeValidator(_method)]
HeaderName = Annotated[str, BeforeValidator(_header_name)]
HttpUrl = Annotated[str, BeforeValidator(_http_url)]
Port = Annotated[int, Field(ge=1, le=65535)]
Network = Annotated[
    IPv4Network | IPv6Network,
    BeforeValidator(lambda v: ip_network(v, strict=False) if isinstance(v, str) else v),
    PlainSerializer(str),
]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Listen(Model):
    host: str = "0.0.0.0"
    port: Port = 8000


def _unset_if_empty(value: object) -> object:
    return None if value == "" else value  # so `${VAR:-}` can leave a setting out


OptionalSetting = Annotated[str | None, BeforeValidator(_unset_if_empty)]


class Admin(Model):
    host: str = "127.0.0.1"
    port: Port = 9901
    # A bearer token for everything on the admin port except the probes and /metrics
    # (docs/security/admin.md), read at start from a file (e.g. a Kubernetes Secret volume) or
    # from the environment variable named here. Required unless `host` is loopback-only.
    token_file: OptionalSetting = None
    token_env: OptionalSetting = None
    # Serve a non-loopback admin port without a token anyway (logged as a warning at start).
    allow_unauthenticated: bool = False

    @model_validator(mode="after")
    def _one_token_source(self) -> Admin:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("set at most one of token_file and token_env")
        return self


def loopback_only(host: str) -> bool:
    """True when `host` accepts connections from this machine only (127.0.0.0/8, ::1,
    localhost); an empty host, a wildcard or any other name or address is reachable from
    elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        address = ip_address(host)
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Store(Model):
    url: str = "memory://"
    timeout: Duration = 0.25
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    max_records: int = Field(default=100_000, ge=1)
    # memory:// only: bytes its records and stored responses may hold (proxy/stores/budget.py).
    max_bytes: Annotated[Size, Field(ge=1024 * 1024)] = DEFAULT_STORE_MAX_BYTES

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        known = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
        if scheme not in known:
            raise ValueError(f"unknown store scheme {scheme!r}; use one of {', '.join(known)}")
        if scheme != "memory":
            parse_url(url)  # raises ValueError naming what is wrong
        return url


class HealthCheck(Model):
    path: str = "/healthz"
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    required: bool = True


def parse_ratio(value: object) -> object:
    """`20%` or `0.2` -> 0.2."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            pass
        raise ValueError(f"expected a ratio like 20% or 0.2, got {value!r}")
    return value


Ratio = Annotated[float, BeforeValidator(parse_ratio), Field(gt=0, le=1)]
ErrorStatus = Annotated[int, Field(ge=400, le=599)]


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


class Quota(Model):
    key: str = "client_ip"
    rate: Rate
    burst: int = Field(default=1, ge=1)
    # A quota store failure admits the request by default: quotas protect capacity, they are
    # not a correctness guarantee like idempotency (whose default is store.on_error).
    on_error: Literal["fail_closed", "fail_open"] = "fail_open"

    @field_validator("key")
    @classmethod
    def _known_key(cls, key: str) -> str:
        if key == "client_ip" or (key.startswith("header:") and _TOKEN_RE.match(key[7:])):
            return key
        raise ValueError(f"quota key must be 'client_ip' or 'header:<Name>', got {key!r}")


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


class Forwarding(Model):
    """Forwarding headers from peers outside `trusted_proxies` are removed: a documented
    default list (docs/security/paths.md) plus these names."""

    strip_headers: list[HeaderName] = Field(default_factory=list)


class Limits(Model):
    max_request_body: Size = 10 * 1024 * 1024
    max_header_bytes: Size = 16 * 1024
    # Deadlines must be positive: 0 would switch aiohttp's header timer off, or cut every write.
    header_timeout: Deadline = 10.0
    body_timeout: Deadline = 30.0
    # A client that accepts no response bytes for this long is disconnected (slow reader).
    write_timeout: Deadline = 30.0
    # Open client connections on the data port; more are answered 503 and closed.
    max_connections: int = Field(default=4096, ge=1)
    # Nesting allowed in the JSON body of a keyed request (it is canonicalised to fingerprint
    # it); deeper is answered 400 json-too-deep before anything is claimed or forwarded.
    max_json_depth: int = Field(default=128, ge=1, le=100_000)


class Logging(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    hash_salt: str = ""
    query_allowlist: list[str] = Field(default_factory=list)
    # Log lines waiting for a slow stdout beyond this are dropped (idemproxy_log_dropped_total).
    buffer_size: Size = 1024 * 1024


# What span export imports; checked when the config is loaded, so `check` catches it too.
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")


class SpanExport(Model):
    """OTLP/HTTP span export (the `otel` extra). Keys left unset fall back to the standard
    OTEL_* environment variables, then to the defaults written here."""

    # Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces,
    # else http://localhost:4318/v1/traces.
    endpoint: HttpUrl | None = None
    # Default: OTEL_EXPORTER_OTLP_TRACES_HEADERS / OTEL_EXPORTER_OTLP_HEADERS.
    headers: dict[str, str] | None = None
    # Share of new traces (no sampled parent) that are recorded; a request whose traceparent
    # says sampled is always recorded, one that says unsampled never (parent-based).
    # Default: OTEL_TRACES_SAMPLER_ARG, else 1.0.
    sampling_ratio: float | None = Field(default=None, ge=0, le=1)
    # Merged over OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME; service.name defaults to idemproxy.
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    # Spans waiting for export beyond this are dropped and counted (the collector may be down).
    max_queue_size: int = Field(default=2048, ge=1)
    max_export_batch_size: int = Field(default=512, ge=1)
    schedule_delay: PositiveDuration = 5.0
    export_timeout: PositiveDuration = 10.0

    @model_validator(mode="after")
    def _extra_installed(self) -> SpanExport:
        missing = [name for name in OTEL_MODULES if not _importable(name)]
        if missing:
            raise ValueError(
                "span export needs the otel extra (pip install 'idemproxy[otel]'); "
                f"missing: {', '.join(missing)}"
            )
        return self


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class Tracing(Model):
    # Absent (the default): trace context is propagated and logged, no span is exported.
    export: SpanExport | None = None


class Shutdown(Model):
    drain_delay: Duration = 5.0
    timeout: Duration = 25.0


class Health(Model):
    """Proxy-wide health settings; per-upstream checks live under `upstreams.<name>.health`."""

    # Also answer /live, /ready and /health on the data port (the upstream may own those paths).
    on_data_port: bool = False
    store_interval: PositiveDuration = 5.0
    store_timeout: PositiveDuration = 1.0


class Reload(Model):
    """Reload on a change of the config file (its directory is polled, so symlink swaps count)."""

    watch: bool = True
    poll_interval: PositiveDuration = 1.0
    debounce: Duration = 0.5


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask); a cgroup CPU limit is not seen."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _workers(value: object) -> object:
    if value == "auto":
        return available_cpus()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a number of processes or 'auto', got {value!r}")


# `auto` is resolved when the file is loaded, so `check` prints the number that will run.
Workers = Annotated[int, BeforeValidator(_workers), Field(ge=1, le=256)]


class Config(Model):
    listen: Listen = Listen()
    admin: Admin = Admin()
    # Processes serving the data port (SO_REUSEPORT); above 1, `run` supervises them.
    workers: Workers = 1
    store: Store = Store()
    upstreams: dict[str, Upstream] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    trusted_proxies: list[Network] = Field(default_factory=list)
    forwarding: Forwarding = Forwarding()
    limits: Limits = Limits()
    logging: Logging = Logging()
    tracing: Tracing = Tracing()
    shutdown: Shutdown = Shutdown()
    health: Health = Health()
    reload: Reload = Reload()


# --- loading ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value, not a list or mapping",
                key_node.start_mark,
            )
        if key in mapping:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def format_path(loc: tuple[int | str, ...]) -> str:
    """('routes', 2, 'upstream') -> 'routes[2].upstream'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def expand_env(data: Any, env: Mapping[str, str], loc: tuple[int | str, ...] = ()) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string value, naming the path on failure."""
    if isinstance(data, str):
        def substitute(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError([f"{format_path(loc)}: environment variable {name} is not set"])

        return _ENV_RE.sub(substitute, data)
    if isinstance(data, dict):
        return {k: expand_env(v, env, (*loc, str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, env, (*loc, i)) for i, v in enumerate(data)]
    return data


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class whose fields live at `loc`, following dicts, lists and optionals."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap(annotation)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _describe(error: Any) -> str:
    # Drop pydantic's validator steps (`function-after[...]`), keep user keys such as `a[b`.
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and _PYDANTIC_STEP.match(p)))
    if error["type"] == "extra_forbidden":
        key = error["loc"][-1]  # the user's key, whatever it looks like
        parent = loc[:-1] if loc and loc[-1] == key else loc
        model = _model_at(parent)
        hint = _did_you_mean(str(key), model.model_fields) if model else ""
        return f"{format_path((*parent, key))}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{format_path(loc)}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{format_path(loc)}: {message}"


def _references(config: Config) -> Iterator[str]:
    seen: set[str] = set()
    for i, route in enumerate(config.routes):
        if route.name in seen:
            yield f"routes[{i}].name: duplicate route name {route.name!r}"
        seen.add(route.name)
        if route.upstream not in config.upstreams:
            hint = _did_you_mean(route.upstream, config.upstreams)
            yield f"routes[{i}].upstream: unknown upstream {route.upstream!r}{hint}"
        yield from _unreachable_retries(i, route)
    if config.shutdown.drain_delay >= config.shutdown.timeout:
        yield "shutdown.drain_delay: must be shorter than shutdown.timeout"
    yield from _workers_need_shared_store(config)
    yield from _admin_needs_a_token(config.admin)


def _admin_needs_a_token(admin: Admin) -> Iterator[str]:
    """POST /admin/drain stops the proxy: off loopback, only a token holder may send it."""
    if loopback_only(admin.host) or admin.allow_unauthenticated:
        return
    if admin.token_file is None and admin.token_env is None:
        yield (
            f"admin.host: {admin.host or '(all interfaces)'} is reachable from other machines, so "
            "the admin actions (/admin/*) need a bearer token: set admin.token_file or "
            "admin.token_env, or admin.allow_unauthenticated: true to accept anyone who can "
            "reach the port"
        )


def _workers_need_shared_store(config: Config) -> Iterator[str]:
    """Worker processes share nothing in memory: idempotency records and quota counters kept
    there would be per worker, so a retry on another connection could execute again."""
    if config.workers == 1 or not config.store.url.startswith("memory:"):
        return
    users = [
        f"routes[{i}].{feature}"
        for i, route in enumerate(config.routes)
        for feature, used in (
            ("idempotency", route.idempotency.enabled),
            ("quota", route.quota is not None),
        )
        if used
    ]
    if users:
        yield (
            f"workers: {config.workers} worker processes require a shared store "
            f"(store.url: redis://...) for {', '.join(users)}; memory:// is per process"
        )


def _unreachable_retries(i: int, route: Route) -> Iterator[str]:
    """Retries beyond not_sent apply to safe methods only; say so when none can match."""
    methods = route.match.methods
    if route.retries is None or methods is None or SAFE_METHODS & set(methods):
        return
    extra = [str(on) for on in route.retries.on if on != "not_sent"]
    if extra:
        yield (
            f"routes[{i}].retries.on: {', '.join(extra)} can only apply to GET, HEAD and OPTIONS, "
            f"and this route matches only {', '.join(methods)}"
        )


def parse(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate already-parsed YAML data; every problem is reported with its path."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of config keys"])
    data = expand_env(data, os.environ if env is None else env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()]) from None
    problems = list(_references(config))
    if problems:
        raise ConfigError(problems)
    return config


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file."""
    return loads(read_text(path), str(path), env)


def loads(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Parse, expand and validate config text; `source` names it in error messages."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    return parse(data, env)


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read config file: {reason}"]) from None


def config_hash(config: Config) -> str:
    """A short stable fingerprint of the effective config, for logs and /health."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
