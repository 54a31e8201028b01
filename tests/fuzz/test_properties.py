"""Hypothesis properties for the pure parsers and filters on the request path, and the config
loader: documented outcomes only, never a crash. The invariants live in tests.fuzz.targets."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, parse
from proxy.idempotency.keys import MAX_KEY_LENGTH, parse_key
from proxy.observability import tracing
from tests.fuzz import targets

HEX = "0123456789abcdef"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

trace_ids = st.text(HEX, min_size=32, max_size=32).filter(lambda t: t != "0" * 32)
span_ids = st.text(HEX, min_size=16, max_size=16).filter(lambda s: s != "0" * 16)
flags = st.text(HEX, min_size=2, max_size=2)


@FAST
@given(trace_ids, span_ids, flags)
def test_valid_traceparent_round_trips(trace_id: str, span_id: str, flag: str) -> None:
    assert tracing.parse_traceparent(f"00-{trace_id}-{span_id}-{flag}") == (trace_id, span_id, flag)


@FAST
@given(trace_ids, span_ids, flags, st.sampled_from(["upper", "version", "extra", "short"]))
def test_mangled_traceparent_is_refused(trace_id: str, span_id: str, flag: str, how: str) -> None:
    value = {
        "upper": f"00-{trace_id.upper()}-{span_id}-{flag}",
        "version": f"ff-{trace_id}-{span_id}-{flag}",  # the one forbidden version
        "extra": f"00-{trace_id}-{span_id}-{flag}-00",
        "short": f"00-{trace_id[1:]}-{span_id}-{flag}",
    }[how]
    if value != f"00-{trace_id}-{span_id}-{flag}":
        assert tracing.parse_traceparent(value) is None


@FAST
@given(trace_ids, span_ids, flags, st.text(HEX, min_size=2, max_size=2), st.text(max_size=20))
def test_later_traceparent_versions_parse_by_their_first_four_fields(
    trace_id: str, span_id: str, flag: str, version: str, rest: str
) -> None:
    value = f"{version}-{trace_id}-{span_id}-{flag}"
    if version not in ("00", "ff"):
        parsed = (trace_id, span_id, flag)
        assert tracing.parse_traceparent(value) == parsed
        assert tracing.parse_traceparent(f"{value}-{rest}".strip(" \t")) == parsed


@FAST
@given(st.text())
def test_any_text_as_trace_header(text: str) -> None:
    targets.check_trace_values(text)


visible = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@FAST
@given(st.text(visible, min_size=1, max_size=MAX_KEY_LENGTH))
def test_every_visible_ascii_key_is_accepted_bare_or_quoted(key: str) -> None:
    assert parse_key(targets.quoted(key)) == key
    bare = parse_key(key)
    if '"' not in key:
        assert bare == key
    elif len(key) >= 2 and key[0] == key[-1] == '"':
        # Itself an RFC 8941 string (hypothesis found '"0"'): it means the key inside, or nothing.
        assert bare is None or targets.quoted(bare) == key
    else:
        assert bare is None


@FAST
@given(st.text(visible, min_size=MAX_KEY_LENGTH + 1, max_size=2 * MAX_KEY_LENGTH))
def test_keys_longer_than_the_limit_are_refused(key: str) -> None:
    assert parse_key(key) is None
    assert parse_key(targets.quoted(key)) is None


@FAST
@given(st.one_of(st.text(), st.text(visible).map(targets.quoted)))
def test_any_text_as_idempotency_key_header(text: str) -> None:
    targets.check_key_value(text)


header_names = st.one_of(
    st.sampled_from(
        ["Connection", "connection", "Keep-Alive", "TE", "Transfer-Encoding", "Content-Length",
         "Upgrade", "Proxy-Authorization", "X-Forwarded-For", "Forwarded", "X-Real-IP", "Host",
         "Via", "traceparent", "X-Trace-Id", "X-Internal", "x-internal", "X_Under"]
    ),
    st.text(min_size=1, max_size=12),
)
header_values = st.one_of(
    st.sampled_from(["close", "keep-alive, X-Internal", "chunked", "chunked, chunked", "gzip",
                     "10.0.0.1", "203.0.113.7, 10.0.0.2", ""]),
    st.text(max_size=40),
)
peers = st.one_of(st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "2001:db8::1", ""]), st.text())


@FAST
@given(peers, st.lists(st.tuples(header_names, header_values), max_size=12))
def test_header_filters_hold_their_invariants(peer: str, items: list[tuple[str, str]]) -> None:
    targets.check_header_filters(peer, items)


@FAST
@given(st.one_of(st.binary(), st.text("/.%;\\aAbB2fFeE5cC07").map(lambda s: ("/" + s).encode())))
def test_request_paths_normalise_to_a_fixed_point(data: bytes) -> None:
    targets.request_path(data)


# Arbitrary YAML-shaped data, and valid configs with one leaf replaced by junk.
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(["1s", "-1s", "10MiB", "http://127.0.0.1:1", "ftp://x", "${UNSET}", "/x"]),
)
yaml_data = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20,
)
VALID: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8000},
    "upstreams": {"app": {"url": "http://127.0.0.1:8080", "timeout": "5s"}},
    "routes": [{"name": "r", "match": {"path_prefix": "/v1", "methods": ["POST"]},
                "upstream": "app", "idempotency": {"enabled": True}}],
    "limits": {"max_request_body": "1MiB", "write_timeout": "1s", "max_connections": 10},
}


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(data, dict):
        return [prefix] + [p for k, v in data.items() for p in _paths(v, (*prefix, k))]
    if isinstance(data, list):
        return [prefix] + [p for i, v in enumerate(data) for p in _paths(v, (*prefix, i))]
    return [prefix]


def _replace(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[path[0]] = _replace(copy[path[0]], path[1:], value)
    return copy


def assert_parses_or_config_error(data: Any) -> None:
    try:
        config = parse(data, env={})
    except ConfigError as exc:
        problems = exc.problems
    else:
        assert isinstance(config, Config)
        return
    assert problems
    assert all(problem and ":" in problem for problem in problems)


@FAST
@given(yaml_data)
def test_config_parse_any_data(data: Any) -> None:
    assert_parses_or_config_error(data)


@FAST
@given(st.sampled_from(_paths(VALID)[1:]), yaml_data)
def test_config_parse_one_bad_leaf(path: tuple[Any, ...], value: Any) -> None:
    assert_parses_or_config_error(_replace(VALID, path, value))


@FAST
@given(yaml_data)
def test_config_text_round_trip(data: Any) -> None:
    """The text loader (YAML errors included) has the same contract as parse."""
    targets.config(yaml.safe_dump(data).encode())


json_ish = st.lists(
    st.sampled_from([
        "[", "]", "{", "}", ",", ":", " ", '"', "\\", "\\u", "d83d", "\\ude00", "0", "1", "-",
        ".", "e", "E", "+", "9007199254740993", "1e400", "true", "null", "a", "\u00e9",
        "\U0001f600", "\ue000", '"a":', '"a":1,"a":2', "\x00", "\xff",
    ]),
    max_size=40,
).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))


@FAST
@given(json_ish)
def test_any_body_fingerprints_as_json_or_is_too_deep(body: bytes) -> None:
    targets.json_fingerprint(body)
    targets.json_fingerprint(b" " + body)
