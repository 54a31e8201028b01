"""W3C Trace Context Level 2 against a real proxy: the cases of the official test suite
(w3c/trace-context test/test.py, STRICT_LEVEL 2), checked on the headers the upstream receives.

The harness's "restart the trace" means: the upstream gets a new trace id; "inherit" means: the
same trace id and a new parent id (the proxy's span). Tracestate is compared member by member.
"""

from __future__ import annotations

import itertools
import re

import pytest

from tests.conformance.conftest import Stack
from tests.support.raw_client import exchange

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
VALID = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"
_SENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_paths = itertools.count()

Header = tuple[str, str]


def forwarded(stack: Stack, headers: list[Header]) -> tuple[str, str, dict[str, str], list[str]]:
    """(trace id, parent id, tracestate members by key, tracestate fields) as the upstream got
    them. Exactly one well-formed version-00 traceparent must arrive."""
    path = f"/trace-context/{next(_paths)}"
    head = f"GET {path} HTTP/1.1\r\nHost: svc\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    response, connection = exchange(stack.port, (head + "\r\n").encode("latin-1"))
    connection.close()
    assert response is not None and response.status == 200
    [sent] = [r for r in stack.upstream.wait_for(1) if r.target == path]
    [traceparent] = sent.all("traceparent")
    match = _SENT.match(traceparent)
    assert match, traceparent
    assert response.header("X-Trace-Id") == match[1]
    fields = sent.all("tracestate")
    members = [m.strip() for m in ",".join(fields).split(",") if m.strip()]
    state = dict(m.split("=", 1) for m in members)
    assert len(state) == len(members), f"duplicate keys passed on: {fields}"
    return match[1], match[2], state, fields


def trace_id(stack: Stack, *headers: Header) -> str:
    return forwarded(stack, list(headers))[0]


def tracestate(stack: Stack, *states: str) -> dict[str, str]:
    headers = [("traceparent", UNSAMPLED), *(("tracestate", s) for s in states)]
    found, _, state, _ = forwarded(stack, headers)
    assert found == TRACE
    return state


def test_missing_headers_start_a_trace(stack: Stack) -> None:
    found, parent, state, _ = forwarded(stack, [])
    assert found != TRACE and parent and state == {}


def test_valid_traceparent_is_inherited_with_a_new_parent(stack: Stack) -> None:
    found, parent, _, _ = forwarded(stack, [("traceparent", VALID)])
    assert (found, parent != PARENT) == (TRACE, True)


@pytest.mark.parametrize("name", ["TraceParent", "TrAcEpArEnT", "TRACEPARENT"])
def test_header_name_is_case_insensitive(stack: Stack, name: str) -> None:
    assert trace_id(stack, (name, VALID)) == TRACE


@pytest.mark.parametrize("name", ["trace-parent", "trace.parent"])
def test_wrong_header_names_are_ignored(stack: Stack, name: str) -> None:
    assert trace_id(stack, (name, VALID)) != TRACE


def test_two_traceparent_fields_restart_the_trace(stack: Stack) -> None:
    found = trace_id(
        stack,
        ("traceparent", f"00-{TRACE[:-1]}1-{PARENT}-01"),
        ("traceparent", VALID),
    )
    assert found not in (TRACE, TRACE[:-1] + "1")


@pytest.mark.parametrize(
    "value",
    [
        f"cc-{TRACE}-{PARENT}-01",
        f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like",
        f"01-{TRACE}-{PARENT}-00-",
        f"fe-{TRACE}-{PARENT}-03-a-b-c",
    ],
)
def test_future_versions_are_parsed_by_their_first_four_fields(stack: Stack, value: str) -> None:
    assert trace_id(stack, ("traceparent", value)) == TRACE


@pytest.mark.parametrize(
    "value",
    [
        f"{VALID}.",  # version 00 has exactly four fields
        f"{VALID}-what-the-future-will-be-like",
        f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like",  # more fields need a dash
        f"ff-{TRACE}-{PARENT}-01",  # version 255 is forbidden
        f".0-{TRACE}-{PARENT}-01",
        f"0.-{TRACE}-{PARENT}-01",
        f"000-{TRACE}-{PARENT}-01",
        f"0000-{TRACE}-{PARENT}-01",
        f"0-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-.{TRACE[1:]}-{PARENT}-01",
        f"00-{TRACE[:-1]}.-{PARENT}-01",
        f"00-{TRACE}3-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-.{PARENT[1:]}-01",
        f"00-{TRACE}-{PARENT[:-1]}.-01",
        f"00-{TRACE}-{PARENT}7-01",
        f"00-{TRACE}-{PARENT[:-1]}-01",
        f"00-{TRACE}-{PARENT}-.0",
        f"00-{TRACE}-{PARENT}-0.",
        f"00-{TRACE}-{PARENT}-001",
        f"00-{TRACE}-{PARENT}-1",
    ],
)
def test_invalid_traceparent_restarts_the_trace(stack: Stack, value: str) -> None:
    found = trace_id(stack, ("traceparent", value))
    assert found not in (TRACE, "0" * 32, TRACE[1:] + "3")


@pytest.mark.parametrize("value", [f" {VALID}", f"\t{VALID}", f"{VALID} ", f"{VALID}\t", f"\t {VALID} \t"])
def test_traceparent_whitespace_is_allowed(stack: Stack, value: str) -> None:
    assert trace_id(stack, ("traceparent", value)) == TRACE


def test_tracestate_without_traceparent_is_discarded(stack: Stack) -> None:
    assert forwarded(stack, [("tracestate", "foo=1,bar=2")])[2] == {}


@pytest.mark.parametrize("name", ["tracestate", "TraceState", "TrAcEsTaTe", "TRACESTATE"])
def test_tracestate_is_inherited(stack: Stack, name: str) -> None:
    _, _, state, _ = forwarded(stack, [("traceparent", UNSAMPLED), (name, "foo=1,bar=2")])
    assert state == {"foo": "1", "bar": "2"}


@pytest.mark.parametrize("name", ["trace-state", "trace.state"])
def test_wrong_tracestate_names_are_ignored(stack: Stack, name: str) -> None:
    assert forwarded(stack, [("traceparent", UNSAMPLED), (name, "foo=1")])[2] == {}


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([""], {}),
        (["foo=1", ""], {"foo": "1"}),
        (["", "foo=1"], {"foo": "1"}),
        (["foo=1 \t , \t bar=2, \t baz=3"], {"foo": "1", "bar": "2", "baz": "3"}),
        (["foo=1\t \t,\t \tbar=2,\t \tbaz=3"], {"foo": "1", "bar": "2", "baz": "3"}),
        ([" foo=1"], {"foo": "1"}),
        (["\tfoo=1"], {"foo": "1"}),
        (["foo=1 "], {"foo": "1"}),
        (["foo=1\t"], {"foo": "1"}),
        (["\t foo=1 \t"], {"foo": "1"}),
    ],
)
def test_tracestate_empty_fields_and_whitespace(
    stack: Stack, states: list[str], expected: dict[str, str]
) -> None:
    assert tracestate(stack, *states) == expected


def test_tracestate_fields_combine_in_order(stack: Stack) -> None:
    _, _, _, fields = forwarded(
        stack,
        [
            ("traceparent", UNSAMPLED),
            ("tracestate", "foo=1,bar=2"),
            ("tracestate", "rojo=1,congo=2"),
            ("tracestate", "baz=3"),
        ],
    )
    assert ",".join(fields) == "foo=1,bar=2,rojo=1,congo=2,baz=3"


KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))


@pytest.mark.parametrize("key", [KEY, KEY + "@a-z0-9_-*/"])
def test_tracestate_all_allowed_characters(stack: Stack, key: str) -> None:
    assert tracestate(stack, f"{key}={VALUE}") == {key: VALUE}


@pytest.mark.parametrize(
    "states",
    [
        ["foo=1,foo=1"],  # duplicated keys
        ["foo=1,foo=2"],
        ["foo=1", "foo=1"],
        ["foo=1", "foo=2"],
        ["foo =1"],  # illegal keys
        ["FOO=1"],
        ["foo.bar=1"],
        ["foo@=1,bar=2"],  # illegal vendor formats
        ["@foo=1,bar=2"],
        ["foo@@bar=1,bar=2"],
        ["foo@bar@baz=1,bar=2"],
        ["foo=1", "z" * 257 + "=1"],  # key length limits
        ["foo=1", "t" * 242 + "@v=1"],
        ["foo=1", "t@" + "v" * 15 + "=1"],
        ["foo=bar=baz"],  # illegal values
        ["foo=,bar=3"],
        [",".join(f"bar{i:02}={i:02}" for i in range(1, 34))],  # 33 members
    ],
)
def test_invalid_tracestate_is_discarded_whole(stack: Stack, states: list[str]) -> None:
    assert tracestate(stack, *states) == {}


@pytest.mark.parametrize(
    "states",
    [
        ["foo=1", "z" * 256 + "=1"],
        ["foo=1", "t" * 241 + "@" + "v" * 14 + "=1"],
    ],
)
def test_tracestate_longest_keys_are_accepted(stack: Stack, states: list[str]) -> None:
    assert tracestate(stack, *states)["foo"] == "1"


def test_tracestate_of_32_members_is_inherited(stack: Stack) -> None:
    members = [f"bar{i:02}={i:02}" for i in range(1, 33)]
    state = tracestate(stack, *(",".join(members[i : i + 10]) for i in range(0, 32, 10)))
    assert len(state) == 32 and state["bar01"] == "01"


def test_overlong_tracestate_is_cut_by_whole_members_from_the_end(stack: Stack) -> None:
    members = [f"k{i:02}={'v' * 40}" for i in range(20)]  # 20 x 44 + 19 commas = 899 characters
    _, _, _, fields = forwarded(
        stack, [("traceparent", UNSAMPLED), ("tracestate", ",".join(members))]
    )
    sent = ",".join(fields)
    assert len(sent) <= 512
    assert sent == ",".join(members[:11])  # 11 x 44 + 10 = 494: the 12th would not fit


def test_overlong_tracestate_loses_long_members_first(stack: Stack) -> None:
    long = "big=" + "x" * 200
    members = [*(f"k{i:02}={'v' * 40}" for i in range(8)), long, "last=1"]
    _, _, state, _ = forwarded(
        stack, [("traceparent", UNSAMPLED), ("tracestate", ",".join(members))]
    )
    assert "big" not in state
    assert state["last"] == "1" and len(state) == 9


def test_each_request_gets_its_own_parent_id(stack: Stack) -> None:
    parents = {forwarded(stack, [("traceparent", VALID)])[1] for _ in range(3)}
    assert len(parents) == 3 and PARENT not in parents
