"""Request checks the HTTP parser leaves to the proxy: pure, cheap, run before routing.

The data server's llhttp parser rejects most malformed framing itself (400 and close, see
proxy/server/head.py), but it accepts HTTP/0.9 and HTTP/2.0 request lines and list forms of
`Transfer-Encoding` (`chunked, chunked`), and it does not mind header names that some upstreams
read as their dash-spelled twins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv6Address
from typing import NamedTuple

from proxy.http.problem import ProblemType

SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})
# RFC 9110 §7.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ]; uri-host is an IP-literal
# ("[" IPv6 "]"; IPvFuture is not served) or a reg-name, which also spells every IPv4 address.
# Possessive quantifiers (`++`, `*+`): runs of name characters match at C speed and never
# backtrack, so a long invalid Host costs linear time.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]++|%[0-9A-Fa-f]{2})*+)"
    r"(?::[0-9]*+)?"
)


class Rejection(NamedTuple):
    problem: ProblemType
    detail: str
    error_type: str


def check_request(
    version: tuple[int, int],
    path: str,
    raw_headers: Iterable[tuple[bytes, bytes]],
    transfer_encodings: Sequence[str],
    max_header_bytes: int,
) -> Rejection | None:
    """The first reason to refuse this request before it reaches any stage, or None.

    `path` is the origin-form path the proxy will forward (the path of an absolute-form target).
    """
    if version not in SUPPORTED_VERSIONS:
        return Rejection(
            ProblemType.HTTP_VERSION_NOT_SUPPORTED,
            f"HTTP/{version[0]}.{version[1]} is not supported; use HTTP/1.1", "bad_request",
        )
    if not path.startswith("/"):
        return _bad(
            ProblemType.BAD_REQUEST_TARGET,
            "only origin-form (/path) and absolute-form targets are served; "
            "CONNECT and asterisk-form are not",
        )
    size = 0
    for name, value in raw_headers:
        size += len(name) + len(value) + 4
        if b"_" in name:
            # Envoy's edge default: some upstreams (CGI, nginx, Django) read X_User as X-User.
            return _bad(
                ProblemType.BAD_HEADER_NAME,
                f"header name {name.decode('latin-1')!r} contains an underscore",
            )
    if size > max_header_bytes:
        return Rejection(
            ProblemType.HEADERS_TOO_LARGE,
            f"the request headers take {size} bytes; the limit is {max_header_bytes}",
            "request_headers_too_large",
        )
    if transfer_encodings and _codings(transfer_encodings) != ["chunked"]:
        # RFC 9112 §6.1: chunked must be the final coding and appear once; the proxy forwards
        # bodies as plain bytes, so any other coding would change their meaning upstream.
        return _bad(
            ProblemType.BAD_TRANSFER_ENCODING,
            f"Transfer-Encoding {', '.join(transfer_encodings)!r}; only 'chunked' is accepted",
        )
    return None


def check_host(host: str | None) -> Rejection | None:
    """Why the client's `Host` is refused, or None. It goes upstream as X-Forwarded-Host, where
    frameworks build absolute URLs from it: only a syntactically valid host and port pass."""
    if host is None:  # HTTP/1.0 may omit it (the server refuses HTTP/1.1 without one)
        return None
    match = _HOST.fullmatch(host)
    if match is not None and (match["ipv6"] is None or _is_ipv6(match["ipv6"])):
        return None
    return _bad(
        ProblemType.BAD_HOST,
        "the Host header is not a host name or an IP address with an optional port",
    )


def _is_ipv6(text: str) -> bool:
    try:
        IPv6Address(text)
    except ValueError:
        return False
    return True


def _codings(values: Sequence[str]) -> list[str]:
    return [token.strip().lower() for value in values for token in value.split(",")]


def _bad(kind: ProblemType, detail: str) -> Rejection:
    return Rejection(kind, detail, "bad_request")
