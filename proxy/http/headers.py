"""Pure header logic: hop-by-hop hygiene, forwarding headers, client address, replay allow-list."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

Headers = list[tuple[str, str]]
Networks = Sequence[IPv4Network | IPv6Network]

# RFC 9110 §7.6.1 plus the de-facto Keep-Alive / Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The proxy frames bodies itself; an upstream or client length is never copied blindly.
FRAMING = frozenset({"content-length", "transfer-encoding"})
# Forwarding headers the proxy sets itself: replaced for untrusted peers, extended for trusted.
FORWARDING = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"}
)
# Headers that upstream frameworks and CDNs read as the client's address, scheme, port, host or
# original URL (Spring, Rack, Symfony, IIS URL Rewrite, Express "trust proxy", werkzeug ProxyFix,
# Akamai, Cloudflare, Fastly): only a trusted proxy may set them, from anyone else they are
# removed. `forwarding.strip_headers` adds names (docs/security/paths.md has the list and why).
UNTRUSTED_FORWARDING = FORWARDING | frozenset(
    {
        # scheme, port, path prefix, server
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-scheme",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "x-forwarded-protocol",
        "x-forwarded-uri",
        "x-forwarded-path",
        "x-url-scheme",
        "front-end-https",
        # client address
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-envoy-external-address",
        # original URL and host (URL rewriting front ends)
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-original-host",
        "x-host",
        # method override: a GET that the upstream runs as POST would walk past a POST-only
        # route's protections (required key, idempotency, quota by method)
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)
REPLAY_ALLOWED = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-language",
        "content-disposition",
        "content-location",
        "location",
        "etag",
        "last-modified",
        "link",
        "cache-control",
    }
)
# Trace context is re-issued by the proxy, never passed on as received.
TRACE_CONTEXT = frozenset({"traceparent", "tracestate", "x-trace-id"})
# Never replayed, even when a route lists them as extras: they describe the original exchange.
NEVER_REPLAYED = HOP_BY_HOP | FRAMING | {"set-cookie", "date"}
VIA = "1.1 idemproxy"
# The data server's default `Server`: no framework or version, which would tell an attacker which
# advisories to try; an upstream's own Server header is relayed as it is.
SERVER = "idemproxy"
# RFC 9110 §5.5: field values never contain CTLs other than HTAB; names are tokens.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Response headers never relayed as they came (the server frames the body itself).
_NOT_RELAYED = HOP_BY_HOP | FRAMING


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Lower-cased option names listed in one or more `Connection` header values."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], drop: frozenset[str] = FRAMING) -> Headers:
    """Remove hop-by-hop headers, every header named in `Connection`, and `drop` (lower-case)."""
    kept: list[tuple[str, str, str]] = []
    connection: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == "connection":
            connection.append(value)
        elif lowered not in HOP_BY_HOP and lowered not in drop:
            kept.append((name, value, lowered))
    return _unlisted(kept, connection)


def _unlisted(kept: list[tuple[str, str, str]], connection: list[str]) -> Headers:
    """(name, value) of `kept` (name, value, lower-cased name) but those `connection` lists."""
    if connection:  # rare on requests and responses alike: one pass otherwise
        listed = connection_tokens(connection)
        return [(name, value) for name, value, lowered in kept if lowered not in listed]
    return [(name, value) for name, value, _ in kept]


def is_trusted(peer: str, trusted: Networks) -> bool:
    if not trusted:
        return False
    try:
        address: IPv4Address | IPv6Address = ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def untrusted_forwarding(extra: Iterable[str]) -> frozenset[str]:
    """The names removed from requests whose peer is not a trusted proxy (lower-case)."""
    return UNTRUSTED_FORWARDING | {name.lower() for name in extra}


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Networks) -> str:
    """The client's address: the peer, or, behind trusted proxies, the rightmost untrusted hop.

    Every hop must be an IP address: the walk from the right stops at the first that is not
    (a port, a name, `unknown`, garbage) and the nearest address known good is the client.
    """
    if not is_trusted(peer, trusted):
        return peer
    client = peer
    for value in reversed(forwarded_for):
        for hop in reversed(value.split(",")):
            try:
                address = ip_address(hop.strip())
            except ValueError:
                return client
            client = str(address)
            if not any(address in network for network in trusted):
                return client
    return client


def upstream_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    peer: str,
    host: str | None,
    trusted: Networks,
    drop: frozenset[str] = frozenset(),
    untrusted: frozenset[str] = UNTRUSTED_FORWARDING,
) -> Headers:
    """Headers to send upstream (see ForwardingRules; this builds the rules for one call)."""
    return ForwardingRules(trusted, drop, untrusted).apply(headers, peer=peer, host=host)


class ForwardingRules:
    """Which request headers go upstream, fixed once per route at config load: hygiene, then
    X-Forwarded-For/-Proto/-Host and Via.

    Client-supplied forwarding headers are kept (and extended) only when the peer is a trusted
    proxy; otherwise those in `untrusted` are removed and the proxy's own set. `Host` is
    dropped: the client sets it from the upstream URL.
    """

    __slots__ = ("_removed", "_removed_trusted", "trusted")

    def __init__(
        self,
        trusted: Networks,
        drop: frozenset[str] = frozenset(),
        untrusted: frozenset[str] = UNTRUSTED_FORWARDING,
    ) -> None:
        self.trusted = trusted
        self._removed_trusted = FRAMING | drop | {"host", "via"}
        self._removed = self._removed_trusted | untrusted

    def apply(self, headers: Iterable[tuple[str, str]], *, peer: str, host: str | None) -> Headers:
        from_trusted = is_trusted(peer, self.trusted)
        out = strip_hop_by_hop(headers, self._removed_trusted if from_trusted else self._removed)
        return _forwarded(out, from_trusted, peer, host)


def _forwarded(out: Headers, from_trusted: bool, peer: str, host: str | None) -> Headers:
    if from_trusted:
        prior = [v for k, v in out if k.lower() == "x-forwarded-for"]
        out = [(k, v) for k, v in out if k.lower() != "x-forwarded-for"]
        out.append(("X-Forwarded-For", ", ".join([*prior, peer])))
        present = {k.lower() for k, _ in out}
        if "x-forwarded-proto" not in present:
            out.append(("X-Forwarded-Proto", "http"))
        if host and "x-forwarded-host" not in present:
            out.append(("X-Forwarded-Host", host))
    else:
        out.append(("X-Forwarded-For", peer))
        out.append(("X-Forwarded-Proto", "http"))
        if host:
            out.append(("X-Forwarded-Host", host))
    out.append(("Via", VIA))
    return out


def relay_headers(headers: Iterable[tuple[str, str]]) -> tuple[Headers, str | None]:
    """An upstream response head, in one pass: the headers to relay to the client (hygiene, no
    upstream framing, Via appended), and why the head must not be relayed at all (None: it
    may; otherwise no headers come back and the client gets a 502).

    A header the client could not parse safely (a CTL, a bad name) or framing that smuggles
    (Transfer-Encoding with Content-Length) is caught before the head is relayed, never after
    the response to the client has begun.
    """
    kept: list[tuple[str, str, str]] = []
    connection: list[str] = []
    framing: set[str] = set()
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            return [], f"invalid header name {name!r}"
        if _BAD_VALUE.search(value):
            return [], f"control character in the value of {name!r}"
        lowered = name.lower()
        if lowered == "connection":
            connection.append(value)
        elif lowered in _NOT_RELAYED:
            if lowered in FRAMING:
                framing.add(lowered)
        else:
            kept.append((name, value, lowered))
    if framing == FRAMING:
        return [], "both Transfer-Encoding and Content-Length (RFC 9112 §6.3: a smuggling signal)"
    out = _unlisted(kept, connection)
    out.append(("Via", VIA))
    return out, None


def replay_headers(headers: Iterable[tuple[str, str]], extra: frozenset[str]) -> Headers:
    """The stored subset of a response's headers: the allow-list plus the route's extras."""
    allowed = (REPLAY_ALLOWED | extra) - NEVER_REPLAYED
    return [(k, v) for k, v in headers if k.lower() in allowed]
