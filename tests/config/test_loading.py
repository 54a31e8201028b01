from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    ConfigError,
    format_duration,
    format_size,
    load,
    parse,
    parse_duration,
    parse_rate,
    parse_size,
)

UPSTREAMS = {"payments": {"url": "http://127.0.0.1:8080"}}
ROUTE = {"name": "pay", "match": {"path_prefix": "/v1"}, "upstream": "payments"}


def config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"upstreams": UPSTREAMS, "routes": [ROUTE]}
    data.update(overrides)
    return data


def problems(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data, env or {})
    return caught.value.problems


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse(config(), {})
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8000)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9901)
    assert (cfg.store.url, cfg.store.timeout, cfg.store.on_error) == ("memory://", 0.25, "fail_closed")
    policy = cfg.routes[0].idempotency
    assert (policy.enabled, policy.required, policy.ttl) == (False, False, 86400.0)
    assert (policy.methods, policy.on_concurrent, policy.max_body) == (["POST", "PATCH"], "reject", 1 << 20)
    assert policy.on_indeterminate == "hold"  # ambiguity is held unless a route opts out
    assert cfg.limits.max_request_body == 10 << 20
    assert cfg.limits.max_header_bytes == 16 << 10
    assert (cfg.shutdown.drain_delay, cfg.shutdown.timeout) == (5.0, 25.0)


def test_unknown_upstream_names_the_path_and_suggests() -> None:
    routes = [ROUTE, ROUTE | {"name": "b"}, ROUTE | {"name": "c", "upstream": "paymnts"}]
    assert problems(config(routes=routes)) == [
        "routes[2].upstream: unknown upstream 'paymnts' (did you mean 'payments'?)"
    ]


def test_on_indeterminate_accepts_hold_or_release_after_lease_only() -> None:
    route = ROUTE | {"idempotency": {"enabled": True, "on_indeterminate": "release_after_lease"}}
    assert parse(config(routes=[route]), {}).routes[0].idempotency.on_indeterminate == (
        "release_after_lease"
    )
    route = ROUTE | {"idempotency": {"enabled": True, "on_indeterminate": "retry"}}
    [problem] = problems(config(routes=[route]))
    assert problem.startswith("routes[0].idempotency.on_indeterminate: ")


def test_duplicate_route_names() -> None:
    assert problems(config(routes=[ROUTE, ROUTE])) == ["routes[1].name: duplicate route name 'pay'"]


@pytest.mark.parametrize("port", [0, -1, 65536, "http"])
def test_bad_port(port: object) -> None:
    [problem] = problems(config(listen={"port": port}))
    assert problem.startswith("listen.port: ")


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8080", "ftp://host", "http://", "http://h/?q=1", "http://h:99999"]
)
def test_bad_upstream_url(url: str) -> None:
    [problem] = problems(config(upstreams={"payments": {"url": url}}))
    assert problem.startswith("upstreams.payments.url: ")


def test_unknown_key_suggests_the_nearest_field_at_its_own_level() -> None:
    routes = [ROUTE | {"idempotency": {"enabled": True, "tll": "1h"}}]
    assert problems(config(routes=routes)) == [
        "routes[0].idempotency.tll: unknown key (did you mean 'ttl'?)"
    ]
    assert problems(config(limts={})) == ["limts: unknown key (did you mean 'limits'?)"]


def test_unknown_key_inside_a_named_upstream() -> None:
    upstreams = {"payments": {"url": "http://h", "timout": "1s"}}
    assert problems(config(upstreams=upstreams)) == [
        "upstreams.payments.timout: unknown key (did you mean 'timeout'?)"
    ]


def test_wrong_types_name_their_paths() -> None:
    found = problems(config(limits={"max_request_body": "lots"}, shutdown={"timeout": True}))
    assert found[0].startswith("limits.max_request_body: expected a size")
    assert found[1].startswith("shutdown.timeout: expected a duration")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(config(listen={"port": 0}, store={"on_error": "maybe"}))
    assert [p.split(":")[0] for p in found] == ["listen.port", "store.on_error"]


def test_missing_required_keys() -> None:
    assert problems({"routes": [ROUTE]}) == ["upstreams: required key is missing"]
    assert problems(config(routes=[{"name": "x", "upstream": "payments", "match": {}}, {}]))[0] == (
        "routes[1].name: required key is missing"
    )


def test_upstream_needs_exactly_one_destination() -> None:
    [problem] = problems(config(upstreams={"payments": {"timeout": "1s"}}))
    assert problem == "upstreams.payments: set exactly one of 'url' or 'targets'"


def test_path_prefix_must_be_absolute() -> None:
    [problem] = problems(config(routes=[ROUTE | {"match": {"path_prefix": "v1"}}]))
    assert problem.startswith("routes[0].match.path_prefix: path_prefix must start with '/'")


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("/v1/%70ayments", "may contain only"),  # one spelling only: no encodings
        ("/v1/pay;x", "may contain only"),
        ("/v1/pay ments", "may contain only"),
        ("/v1//payments", "normal form"),
        ("/v1/./payments", "normal form"),
        ("/x/../v1", "normal form"),
        ("/v1/..", "normal form"),
        ("//", "normal form"),
    ],
)
def test_path_prefix_has_a_single_spelling(prefix: str, why: str) -> None:
    [problem] = problems(config(routes=[ROUTE | {"match": {"path_prefix": prefix}}]))
    assert problem.startswith("routes[0].match.path_prefix: path_prefix ")
    assert why in problem


@pytest.mark.parametrize("prefix", ["/", "/v1", "/v1/", "/.well-known/x", "/a-b_c~d.e"])
def test_path_prefixes_in_normal_form_load(prefix: str) -> None:
    route = parse(config(routes=[ROUTE | {"match": {"path_prefix": prefix}}]), {}).routes[0]
    assert (route.match.path_prefix, route.match.ignore_case) == (prefix, False)


def test_forwarding_strip_headers_are_header_names() -> None:
    assert parse(config(), {}).forwarding.strip_headers == []
    loaded = parse(config(forwarding={"strip_headers": ["X-Tenant"]}), {})
    assert loaded.forwarding.strip_headers == ["X-Tenant"]
    [problem] = problems(config(forwarding={"strip_headers": ["X Tenant"]}))
    assert problem.startswith("forwarding.strip_headers[0]: not a header name")


def test_drain_delay_must_fit_in_the_shutdown_timeout() -> None:
    assert problems(config(shutdown={"drain_delay": "30s", "timeout": "25s"})) == [
        "shutdown.drain_delay: must be shorter than shutdown.timeout"
    ]


def test_top_level_must_be_a_mapping() -> None:
    assert problems(["a"]) == ["(top level): expected a mapping of config keys"]


def test_env_expansion_with_defaults_and_missing_variables() -> None:
    data = config(store={"url": "${STORE:-memory://}"}, listen={"port": "${PORT}"})
    cfg = parse(data, {"PORT": "8123"})
    assert (cfg.store.url, cfg.listen.port) == ("memory://", 8123)
    assert parse(data, {"PORT": "1", "STORE": "redis://r:6379/0"}).store.url == "redis://r:6379/0"
    assert problems(data) == ["listen.port: environment variable PORT is not set"]


def test_store_scheme_is_checked() -> None:
    [problem] = problems(config(store={"url": "memcached://x"}))
    assert problem.startswith("store.url: unknown store scheme 'memcached'")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("24h", 86400.0), ("7d", 604800.0), (2, 2.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10", "1w", "-1s", True, "1.5.1s", -3])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"), [("1MiB", 1 << 20), ("16KiB", 16 << 10), ("10MB", 10**7), ("512", 512), (7, 7)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1XB", "lots", "-1", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_rates() -> None:
    assert parse_rate("100/s") == 100.0
    assert parse_rate("60/m") == 1.0
    with pytest.raises(ValueError, match="rate"):
        parse_rate("0/s")


@pytest.mark.parametrize("seconds", [0.25, 1.0, 30.0, 90.0, 300.0, 86400.0, 1.5])
def test_duration_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("size", [1, 1000, 1024, 16 << 10, 1 << 20, 3 << 30])
def test_size_format_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams:\n  app: {url: http://h\nroutes: [\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}:3:")
    assert "invalid YAML" in problem


def test_duplicate_yaml_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("listen: {port: 1}\nlisten: {port: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'listen' \\(line 2\\)"):
        load(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file: No such file or directory"):
        load(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(binary)


def test_config_is_frozen() -> None:
    cfg = parse(config(), {})
    with pytest.raises(ValueError, match="frozen"):
        cfg.listen.port = 1  # type: ignore[misc]


IDEMPOTENT_ROUTE = {**ROUTE, "idempotency": {"enabled": True}}
QUOTA_ROUTE = {**ROUTE, "name": "api", "quota": {"rate": "10/s"}}


def test_workers_default_to_one_and_auto_means_the_cpus_we_may_use() -> None:
    import os

    assert parse(config(), {}).workers == 1
    assert parse(config(workers="auto"), {}).workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", [0, -1, "lots", 1.5, True])
def test_workers_must_be_a_positive_count_or_auto(value: object) -> None:
    assert problems(config(workers=value))[0].startswith("workers: ")


def test_workers_with_a_memory_store_refuse_idempotency_and_quotas_naming_the_routes() -> None:
    found = problems(config(workers=2, routes=[IDEMPOTENT_ROUTE, QUOTA_ROUTE]))
    assert found == [
        "workers: 2 worker processes require a shared store (store.url: redis://...) for "
        "routes[0].idempotency, routes[1].quota; memory:// is per process"
    ]


def test_workers_with_redis_or_without_stateful_routes_are_fine() -> None:
    shared = {"url": "redis://127.0.0.1:6390/0"}
    assert parse(config(workers=2, store=shared, routes=[IDEMPOTENT_ROUTE]), {}).workers == 2
    assert parse(config(workers=2), {}).workers == 2
