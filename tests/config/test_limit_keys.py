"""The hardening limits in the config: defaults, units, and values that would disable them."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse

BASE: dict[str, Any] = {
    "upstreams": {"app": {"url": "http://127.0.0.1:1"}},
    "routes": [{"name": "r", "upstream": "app"}],
}


def test_defaults_are_the_documented_ones() -> None:
    limits = parse(BASE, env={}).model_dump(mode="json")["limits"]
    assert limits == {
        "max_request_body": "10MiB",
        "max_header_bytes": "16KiB",
        "header_timeout": "10s",
        "body_timeout": "30s",
        "write_timeout": "30s",
        "max_connections": 4096,
        "max_json_depth": 128,
    }


def test_units() -> None:
    limits = parse({**BASE, "limits": {"write_timeout": "250ms", "max_connections": 10}}, env={})
    assert limits.limits.write_timeout == 0.25
    assert limits.limits.max_connections == 10


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("header_timeout", "0s", "Input should be greater than 0"),
        ("body_timeout", 0, "Input should be greater than 0"),
        ("write_timeout", "0ms", "Input should be greater than 0"),
        ("max_connections", 0, "Input should be greater than or equal to 1"),
        ("max_json_depth", 0, "Input should be greater than or equal to 1"),
        ("max_json_depth", 100_001, "Input should be less than or equal to 100000"),
    ],
)
def test_values_that_would_switch_a_limit_off_are_refused(
    key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({**BASE, "limits": {key: value}}, env={})
    assert caught.value.problems == [f"limits.{key}: {message}"]
