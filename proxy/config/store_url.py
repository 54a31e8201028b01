"""Pure parsing of Redis store URLs (no redis import, so config validation can use it).

    redis://[user:pw@]host:port/db          rediss://...?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required
    redis+sentinel://[user:pw@]host:26379,host2:26379/service/db
    redis+cluster://[user:pw@]host:7000,host2:7001
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.config.urls import redact_url


class StoreKind(StrEnum):
    """The store a URL names, by its scheme: the one place a scheme string is written."""

    MEMORY = "memory"
    REDIS = "redis"
    REDISS = "rediss"  # Redis over TLS
    SENTINEL = "redis+sentinel"
    CLUSTER = "redis+cluster"


REDIS_KINDS = frozenset(StoreKind) - {StoreKind.MEMORY}
TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"})
CERT_REQS = frozenset({"none", "optional", "required"})


@dataclass(frozen=True, slots=True)
class StoreUrl:
    kind: StoreKind
    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    db: int
    service: str | None  # Sentinel service (master group) name
    tls: dict[str, str] = field(default_factory=dict)  # rediss:// options from the query


def parse_url(url: str) -> StoreUrl:
    """Split a store URL; several comma-separated hosts are allowed for Sentinel and Cluster."""
    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.scheme not in REDIS_KINDS:
        raise ValueError(f"store URL {shown!r}: not a Redis URL")
    kind = StoreKind(parts.scheme)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    default_port = 26379 if kind is StoreKind.SENTINEL else 6379
    hosts = [_host_port(item, default_port) for item in hostlist.split(",") if item]
    if not hosts:
        raise ValueError(f"store URL {shown!r} names no host")
    if len(hosts) > 1 and kind in (StoreKind.REDIS, StoreKind.REDISS):
        raise ValueError(
            f"store URL {shown!r}: use redis+sentinel or redis+cluster for several hosts"
        )
    segments = [s for s in parts.path.split("/") if s]
    service = None
    if kind is StoreKind.SENTINEL:
        if not segments:
            raise ValueError(f"store URL {shown!r} needs the Sentinel service name: "
                             "redis+sentinel://host:26379/mymaster/0")
        service = unquote(segments.pop(0))
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError(f"store URL {shown!r}: the database must be a number")
    db = int(segments[0]) if segments else 0
    if db and kind is StoreKind.CLUSTER:
        raise ValueError("Redis Cluster has only database 0")
    return StoreUrl(
        kind, hosts, unquote(username) or None, unquote(password) or None, db, service,
        _tls_options(kind, parts.query, shown),
    )


def _tls_options(kind: StoreKind, query: str, shown: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    if options and kind is not StoreKind.REDISS:
        raise ValueError(f"store URL {shown!r}: query options are only for rediss:// (TLS)")
    unknown = sorted(set(options) - TLS_OPTIONS)
    if unknown:
        raise ValueError(f"store URL {shown!r}: unknown option {unknown[0]!r}; "
                         f"use {', '.join(sorted(TLS_OPTIONS))}")
    if options.get("ssl_cert_reqs", "required") not in CERT_REQS:
        raise ValueError(f"store URL {shown!r}: ssl_cert_reqs must be none, optional or required")
    return options


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:6379
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad host in store URL: {item!r}")
    return host, int(port) if port else default_port
