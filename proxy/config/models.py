"""The whole config (`Config`) and its proxy-wide sections: listen, admin, store, limits,
logging, tracing, shutdown, health, reload, workers."""

from __future__ import annotations

import importlib.util
import os
from ipaddress import IPv6Address, ip_address
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from proxy.config.fields import HeaderName, HttpUrl, Model, Network, OptionalSetting, Port
from proxy.config.models_route import Route
from proxy.config.models_upstream import Upstream
from proxy.config.store_url import StoreKind, parse_url
from proxy.config.units import Deadline, Duration, PositiveDuration, Size

# Leaves room for the proxy itself (~51Mi idle) and a keyed 10MiB request body being
# fingerprinted in a sidecar limited to 128Mi (docs/security/memory-store.md).
DEFAULT_STORE_MAX_BYTES = 32 * 1024 * 1024


class Listen(Model):
    host: str = "0.0.0.0"
    port: Port = 8000


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
    # Parsed from `url` once at load; not a YAML key (so not in `check` output or the hash).
    _kind: StoreKind = PrivateAttr(default=StoreKind.MEMORY)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in set(StoreKind):
            known = ", ".join(StoreKind)
            raise ValueError(f"unknown store scheme {scheme!r}; use one of {known}")
        if scheme != StoreKind.MEMORY:
            parse_url(url)  # raises ValueError naming what is wrong
        return url

    @model_validator(mode="after")
    def _parse_kind(self) -> Store:
        self._kind = StoreKind(urlsplit(self.url).scheme)
        return self

    @property
    def kind(self) -> StoreKind:
        return self._kind


class Forwarding(Model):
    """Forwarding headers from peers outside `trusted_proxies` are removed: a documented
    default list (docs/security/paths.md) plus these names."""

    strip_headers: list[HeaderName] = Field(default_factory=list)


class Limits(Model):
    max_request_body: Size = 10 * 1024 * 1024
    max_header_bytes: Size = 16 * 1024
    # Deadlines must be positive: 0 would make the data server close every connection at once.
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
