"""The client's Host: uri-host [":" port] (RFC 9110 §7.2), anything else a 400 bad-host."""

from __future__ import annotations

import time

import pytest

from proxy.http.request_checks import check_host


@pytest.mark.parametrize(
    "host",
    ["shop.example", "shop.example:8443", "127.0.0.1", "127.0.0.1:80", "[::1]", "[2001:db8::1]:80",
     "xn--bcher-kva.example", "a%41b", "localhost:", "", None],
)
def test_valid_hosts_pass(host: str | None) -> None:
    assert check_host(host) is None


@pytest.mark.parametrize(
    "host",
    ["evil.example/x", "user@evil.example", "a b", "a:b", "a:80:80", "[::g]", "[v1.x]", "::1",
     "[::1", "a%4", "bücher.example", "a\tb", "a?b", "a#b", "a\\b"],
)
def test_invalid_hosts_are_refused(host: str) -> None:
    rejection = check_host(host)
    assert rejection is not None
    assert (rejection.problem.status, rejection.problem.slug) == (400, "bad-host")
    assert host not in rejection.detail  # the detail never echoes client bytes


def test_a_long_invalid_host_costs_linear_time() -> None:
    started = time.perf_counter()
    assert check_host("a" * 16_000 + " ") is not None
    assert check_host("a%41" * 4_000 + "%") is not None
    assert time.perf_counter() - started < 0.5  # a backtracking pattern takes minutes here
