"""Validation of the resilience keys: every rejection names its YAML path."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, QuotaKey, QuotaKeySource, parse


def config(upstream: dict[str, Any] | None = None, route: dict[str, Any] | None = None) -> Any:
    return {
        "upstreams": {"app": {"url": "http://127.0.0.1:9", **(upstream or {})}},
        "routes": [{"name": "r", "upstream": "app", **(route or {})}],
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data, env={})
    return caught.value.problems


def test_defaults_resolve() -> None:
    parsed = parse(
        config({"circuit_breaker": {}}, {"retries": {}, "quota": {"rate": "10/s"}}), env={}
    )
    breaker = parsed.upstreams["app"].circuit_breaker
    assert breaker is not None
    assert (breaker.consecutive_failures, breaker.open_for, breaker.failure_ratio) == (5, 10, None)
    assert breaker.failure_statuses == [502, 503, 504]
    assert (breaker.window, breaker.min_requests, breaker.half_open_requests) == (10, 20, 1)
    assert parsed.upstreams["app"].max_inflight is None
    retries = parsed.routes[0].retries
    assert retries is not None
    assert (retries.attempts, retries.backoff, retries.max_backoff) == (2, 0.025, 0.25)
    assert (retries.budget, retries.min_concurrent, retries.on) == (0.2, 3, ["not_sent"])
    assert parsed.routes[0].quota is not None
    assert parsed.routes[0].quota.on_error == "fail_open"


def test_percent_ratio_and_statuses_parse() -> None:
    parsed = parse(
        config(
            {"circuit_breaker": {"failure_ratio": "50%", "consecutive_failures": None}},
            {"retries": {"budget": "10%", "on": ["ambiguous", 503]}},
        ),
        env={},
    )
    assert parsed.upstreams["app"].circuit_breaker.failure_ratio == 0.5  # type: ignore[union-attr]
    assert parsed.routes[0].retries.budget == 0.1  # type: ignore[union-attr]
    assert parsed.routes[0].retries.on == ["ambiguous", 503]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("upstream", "route", "expected"),
    [
        (
            {"circuit_breaker": {"consecutive_failures": None}},
            {},
            "upstreams.app.circuit_breaker: set consecutive_failures or failure_ratio",
        ),
        (
            {"circuit_breaker": {"failure_ratio": 1.5}},
            {},
            "upstreams.app.circuit_breaker.failure_ratio: Input should be less than or equal to 1",
        ),
        (
            {"circuit_breaker": {"failure_ratio": "half"}},
            {},
            "upstreams.app.circuit_breaker.failure_ratio:",
        ),
        (
            {"circuit_breaker": {"failure_statuses": [200]}},
            {},
            "upstreams.app.circuit_breaker.failure_statuses[0]: Input should be greater than",
        ),
        (
            {"circuit_breaker": {"open_for": "0s"}},
            {},
            "upstreams.app.circuit_breaker: open_for and window must be above 0",
        ),
        (
            {"circuit_breaker": {"min_requests": 0}},
            {},
            "upstreams.app.circuit_breaker.min_requests: Input should be greater than",
        ),
        (
            {"circuit_breaker": {"half_open_request": 2}},
            {},
            "upstreams.app.circuit_breaker.half_open_request: unknown key "
            "(did you mean 'half_open_requests'?)",
        ),
        (
            {"circuit_breaker": {"window": "soon"}},
            {},
            "upstreams.app.circuit_breaker.window: expected a duration",
        ),
        ({"max_inflight": 0}, {}, "upstreams.app.max_inflight: Input should be greater than"),
        (
            {"url": None, "targets": [{"url": "http://127.0.0.1:9", "weight": 0}]},
            {},
            "upstreams.app: at least one target needs a weight above 0",
        ),
        (
            {"url": None, "targets": [{"url": "http://127.0.0.1:9", "weight": -1}]},
            {},
            "upstreams.app.targets[0].weight: Input should be greater than or equal to 0",
        ),
        (
            {"url": None, "targets": [{"url": "http://127.0.0.1:9", "wieght": 1}]},
            {},
            "upstreams.app.targets[0].wieght: unknown key (did you mean 'weight'?)",
        ),
        ({}, {"retries": {"attempts": 0}}, "routes[0].retries.attempts: Input should be greater"),
        ({}, {"retries": {"attempts": 11}}, "routes[0].retries.attempts: Input should be less"),
        (
            {},
            {"retries": {"backoff": "1s", "max_backoff": "10ms"}},
            "routes[0].retries: max_backoff must not be below backoff",
        ),
        ({}, {"retries": {"budget": "abc%"}}, "routes[0].retries.budget: expected a ratio"),
        ({}, {"retries": {"budget": 0}}, "routes[0].retries.budget: Input should be greater"),
        (
            {},
            {"retries": {"on": ["connect"]}},
            "routes[0].retries.on[0]: expected not_sent, ambiguous or a status 400-599",
        ),
        (
            {},
            {"retries": {"on": [302]}},
            "routes[0].retries.on[0]: expected not_sent, ambiguous or a status 400-599",
        ),
        ({}, {"retries": {"min_concurrent": -1}}, "routes[0].retries.min_concurrent: Input"),
        (
            {},
            {"retries": {"attempt": 3}},
            "routes[0].retries.attempt: unknown key (did you mean 'attempts'?)",
        ),
        ({}, {"quota": {"burst": 5}}, "routes[0].quota.rate: required key is missing"),
        ({}, {"quota": {"rate": "5/day"}}, "routes[0].quota.rate: expected a rate like 100/s"),
        ({}, {"quota": {"rate": "5/s", "burst": 0}}, "routes[0].quota.burst: Input should be"),
        (
            {},
            {"quota": {"rate": "5/s", "key": "cookie:x"}},
            "routes[0].quota.key: quota key must be 'client_ip' or 'header:<Name>'",
        ),
        (
            {},
            {"quota": {"rate": "5/s", "on_error": "ignore"}},
            "routes[0].quota.on_error: Input should be 'fail_closed' or 'fail_open'",
        ),
    ],
)
def test_rejections_name_the_path(
    upstream: dict[str, Any], route: dict[str, Any], expected: str
) -> None:
    found = problems(config(upstream, route))
    assert any(p.startswith(expected) for p in found), found


def test_retry_classes_no_method_of_the_route_can_use_are_rejected() -> None:
    route = {"match": {"methods": ["POST"]}, "retries": {"on": ["not_sent", 503, "ambiguous"]}}
    assert problems(config(route=route)) == [
        "routes[0].retries.on: 503, ambiguous can only apply to GET, HEAD and OPTIONS, "
        "and this route matches only POST"
    ]
    route["retries"] = {"on": ["not_sent"]}
    assert parse(config(route=route), env={}).routes[0].retries is not None


@pytest.mark.parametrize(
    ("written", "key"),
    [
        (None, QuotaKey(QuotaKeySource.CLIENT_IP)),
        ("client_ip", QuotaKey(QuotaKeySource.CLIENT_IP)),
        ("header:X-Tenant", QuotaKey(QuotaKeySource.HEADER, "X-Tenant")),
        ("header:x-api-key", QuotaKey(QuotaKeySource.HEADER, "x-api-key")),
    ],
)
def test_quota_key_is_parsed_once_and_printed_as_written(written: str | None, key: QuotaKey) -> None:
    quota: dict[str, Any] = {"rate": "5/s"} if written is None else {"rate": "5/s", "key": written}
    parsed = parse(config(route={"quota": quota}), env={})
    assert parsed.routes[0].quota is not None
    assert parsed.routes[0].quota.key == key
    dumped = parsed.model_dump(mode="json")  # what `idemproxy check` prints
    assert dumped["routes"][0]["quota"]["key"] == (written or "client_ip")
    assert parse(dumped, env={}) == parsed


@pytest.mark.parametrize(
    "written",
    ["header:", "header", "Header:X", "client_ip:X", "header:X Tenant", "header:X:Y", "cookie:x", 5],
)
def test_quota_key_rejects_other_spellings(written: object) -> None:
    found = problems(config(route={"quota": {"rate": "5/s", "key": written}}))
    assert found == [
        f"routes[0].quota.key: quota key must be 'client_ip' or 'header:<Name>', got {written!r}"
    ]
