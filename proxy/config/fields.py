"""Field types shared by the config models (methods, header names, URLs, ports, networks) and
their strict base model."""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from proxy.config.urls import redact_url

TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _method(value: object) -> object:
    if isinstance(value, str) and TOKEN_RE.match(value):
        return value.upper()
    raise ValueError(f"not an HTTP method: {value!r}")


def _header_name(value: object) -> object:
    if isinstance(value, str) and TOKEN_RE.match(value):
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


Method = Annotated[str, BeforeValidator(_method)]
HeaderName = Annotated[str, BeforeValidator(_header_name)]
HttpUrl = Annotated[str, BeforeValidator(_http_url)]
Port = Annotated[int, Field(ge=1, le=65535)]
Network = Annotated[
    IPv4Network | IPv6Network,
    BeforeValidator(lambda v: ip_network(v, strict=False) if isinstance(v, str) else v),
    PlainSerializer(str),
]
ErrorStatus = Annotated[int, Field(ge=400, le=599)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _unset_if_empty(value: object) -> object:
    return None if value == "" else value  # so `${VAR:-}` can leave a setting out


OptionalSetting = Annotated[str | None, BeforeValidator(_unset_if_empty)]
