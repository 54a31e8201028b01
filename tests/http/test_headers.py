from ipaddress import ip_network

import pytest

from proxy.http.headers import (
    client_address,
    connection_tokens,
    relay_headers,
    replay_headers,
    strip_hop_by_hop,
    untrusted_forwarding,
    upstream_request_headers,
)

TRUSTED = [ip_network("10.0.0.0/8"), ip_network("::1/128")]


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [k.lower() for k, _ in headers]


def test_connection_tokens_across_values() -> None:
    assert connection_tokens(["close, X-A", " x-b ,", ""]) == {"close", "x-a", "x-b"}


@pytest.mark.parametrize(
    "hop",
    ["Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
     "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding", "Upgrade"],
)
def test_every_hop_by_hop_header_is_removed(hop: str) -> None:
    assert strip_hop_by_hop([(hop, "x"), ("X-Keep", "1")]) == [("X-Keep", "1")]


def test_headers_named_in_connection_are_removed() -> None:
    headers = [("Connection", "keep-alive, X-Secret"), ("X-Secret", "s"), ("x-other", "o")]
    assert strip_hop_by_hop(headers) == [("x-other", "o")]


def test_upstream_headers_replace_client_forwarding_headers_from_untrusted_peers() -> None:
    incoming = [
        ("Host", "shop.example"), ("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"), ("X-Forwarded-Proto", "https"), ("Content-Length", "3"),
        ("Via", "1.0 fake"), ("Accept", "*/*"),
    ]
    out = upstream_request_headers(incoming, peer="192.0.2.7", host="shop.example", trusted=TRUSTED)
    assert out == [
        ("Accept", "*/*"),
        ("X-Forwarded-For", "192.0.2.7"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "shop.example"),
        ("Via", "1.1 idemproxy"),
    ]


def test_upstream_headers_extend_forwarding_headers_from_trusted_proxies() -> None:
    incoming = [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "api.example")]
    out = upstream_request_headers(incoming, peer="10.1.2.3", host="internal", trusted=TRUSTED)
    assert ("X-Forwarded-For", "203.0.113.9, 10.1.2.3") in out
    assert ("X-Forwarded-Proto", "https") in out
    assert ("X-Forwarded-Host", "api.example") in out
    assert names(out).count("x-forwarded-for") == 1


def test_upstream_headers_drop_listed_names() -> None:
    out = upstream_request_headers(
        [("traceparent", "x"), ("A", "1")], peer="1.1.1.1", host=None, trusted=[],
        drop=frozenset({"traceparent"}),
    )
    assert names(out) == ["a", "x-forwarded-for", "x-forwarded-proto", "via"]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("192.0.2.1", ["6.6.6.6"], "192.0.2.1"),  # untrusted peer: its header is ignored
        ("10.0.0.1", ["203.0.113.5"], "203.0.113.5"),
        ("10.0.0.1", ["6.6.6.6, 203.0.113.5, 10.0.0.9"], "203.0.113.5"),  # rightmost untrusted
        ("10.0.0.1", ["10.0.0.2", "10.0.0.3"], "10.0.0.2"),  # all trusted: the first hop
        ("10.0.0.1", [], "10.0.0.1"),
        ("::1", ["2001:db8::1"], "2001:db8::1"),
        # A hop that is not an IP address ends the walk: the nearest good address is the client.
        ("10.0.0.1", ["not-an-ip"], "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.5, evil, 10.0.0.9"], "10.0.0.9"),
        ("10.0.0.1", ["203.0.113.5:4711"], "10.0.0.1"),
        ("10.0.0.1", ["[2001:db8::1]"], "10.0.0.1"),
        ("10.0.0.1", ["unknown"], "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.5, "], "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.5", "10.0.0.2"], "203.0.113.5"),
        ("10.0.0.1", ["2001:DB8:0::1"], "2001:db8::1"),  # one spelling per address (quota keys)
    ],
)
def test_client_address(peer: str, xff: list[str], expected: str) -> None:
    assert client_address(peer, xff, TRUSTED) == expected


SPOOFABLE = [
    "X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Scheme", "X-Forwarded-Server",
    "X-Forwarded-Ssl", "True-Client-IP", "X-Client-IP", "CF-Connecting-IP", "X-Original-URL",
    "X-Rewrite-URL", "X-Real-IP", "Fastly-Client-IP", "X-Cluster-Client-IP", "X-Forwarded-Uri",
    "X-Original-Host", "X-Envoy-External-Address", "X-HTTP-Method-Override", "X-HTTP-Method",
    "X-Method-Override",
]


@pytest.mark.parametrize("name", SPOOFABLE)
def test_spoofable_forwarding_headers_are_removed_from_untrusted_peers(name: str) -> None:
    incoming = [(name, "6.6.6.6"), (name.upper(), "x"), ("Accept", "*/*")]
    out = upstream_request_headers(incoming, peer="192.0.2.7", host="a", trusted=TRUSTED)
    assert name.lower() not in names(out)
    assert ("Accept", "*/*") in out


@pytest.mark.parametrize("name", SPOOFABLE)
def test_spoofable_forwarding_headers_pass_from_trusted_proxies(name: str) -> None:
    out = upstream_request_headers([(name, "203.0.113.9")], peer="10.1.2.3", host="a",
                                   trusted=TRUSTED)
    assert (name, "203.0.113.9") in out


def test_configured_names_are_removed_too() -> None:
    untrusted = untrusted_forwarding(["X-Tenant-Verified"])
    assert {"x-tenant-verified", "x-original-url", "x-forwarded-for"} <= untrusted
    incoming = [("x-tenant-verified", "yes"), ("X-Other", "1")]
    out = upstream_request_headers(incoming, peer="192.0.2.7", host=None, trusted=TRUSTED,
                                   untrusted=untrusted)
    assert names(out) == ["x-other", "x-forwarded-for", "x-forwarded-proto", "via"]
    kept = upstream_request_headers(incoming, peer="10.0.0.1", host=None, trusted=TRUSTED,
                                    untrusted=untrusted)
    assert ("x-tenant-verified", "yes") in kept


def test_downstream_headers_drop_framing_and_hop_by_hop() -> None:
    upstream = [("Transfer-Encoding", "chunked"), ("Connection", "X-A"),
                ("X-A", "1"), ("Keep-Alive", "timeout=5"), ("Content-Type", "text/plain"),
                ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert relay_headers(upstream) == ([
        ("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Via", "1.1 idemproxy"),
    ], None)
    assert relay_headers([("Content-Length", "5"), *upstream[1:]])[0][-1] == ("Via", "1.1 idemproxy")


@pytest.mark.parametrize(
    ("field", "why"),
    [(("Content-Length", "5"), "smuggling"), (("X-A", "a\r\nb"), "control character"),
     (("X A", "1"), "invalid header name"), (("X-A", "a\x00b"), "control character")],
)
def test_a_head_the_client_could_misread_is_not_relayed(field: tuple[str, str], why: str) -> None:
    upstream = [("Transfer-Encoding", "chunked"), ("Content-Type", "text/plain"), field]
    relayed, problem = relay_headers(upstream)
    assert relayed == []
    assert problem is not None and why in problem


def test_replay_allow_list_and_extras_never_include_cookies_or_dates() -> None:
    stored = [("Content-Type", "application/json"), ("Location", "/r/1"), ("ETag", '"v1"'),
              ("Set-Cookie", "s=1"), ("Date", "today"), ("X-RateLimit-Remaining", "3"),
              ("X-Order", "7"), ("Transfer-Encoding", "chunked")]
    extras = frozenset({"x-order", "set-cookie", "date", "transfer-encoding"})
    assert replay_headers(stored, extras) == [
        ("Content-Type", "application/json"), ("Location", "/r/1"), ("ETag", '"v1"'),
        ("X-Order", "7"),
    ]
