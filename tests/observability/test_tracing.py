"""Trace context: the pure parsers (tables + properties) and the stage end to end."""

from __future__ import annotations

import re

import pytest
from aiohttp import ClientSession
from hypothesis import given
from hypothesis import strategies as st

from proxy.observability.tracing import (
    MAX_TRACESTATE,
    new_span_id,
    new_trace_id,
    parse_trace_id,
    parse_traceparent,
    parse_tracestate,
    propagated_flags,
)
from tests.support.observed import observe
from tests.support.ports import wait_until
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", (TRACE, SPAN, "01")),
        (f"00-{TRACE}-{SPAN}-00", (TRACE, SPAN, "00")),
        (f"00-{TRACE}-{SPAN}-03", (TRACE, SPAN, "03")),  # sampled + random (Level 2)
        (f"00-{TRACE}-{SPAN}-ff", (TRACE, SPAN, "ff")),  # as received; cleared when sent on
        (f" 00-{TRACE}-{SPAN}-01\t", (TRACE, SPAN, "01")),  # optional whitespace
        (f"00-{TRACE.upper()}-{SPAN}-01", None),  # uppercase hex
        (f"01-{TRACE}-{SPAN}-01", (TRACE, SPAN, "01")),  # a later version: first four fields
        (f"cc-{TRACE}-{SPAN}-01-future", (TRACE, SPAN, "01")),
        (f"cc-{TRACE}-{SPAN}-01.future", None),  # later fields follow a dash
        (f"ff-{TRACE}-{SPAN}-01", None),  # forbidden version
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),  # short trace id
        (f"00-{TRACE}-{SPAN}0-01", None),  # long parent id
        (f"00-{TRACE}-{SPAN}-1", None),  # short flags
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # trailing data in version 00
        (f"00_{TRACE}_{SPAN}_01", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_traceparent(header: str | None, expected: tuple[str, str, str] | None) -> None:
    assert parse_traceparent(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACE, TRACE),
        ("4BF92F35-77B3-4DA6-A3CE-929D0E0E4736", TRACE),  # UUID form, any case: normalised
        ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", TRACE),
        (TRACE.upper(), None),  # plain form must already be lowercase
        ("0" * 32, None),
        ("00000000-0000-0000-0000-000000000000", None),
        (TRACE[:-1], None),
        (TRACE + "0", None),
        ("4bf92f35-77b3-4da6-a3ce-929d0e0e473", None),
        ("{4bf92f35-77b3-4da6-a3ce-929d0e0e4736}", None),
        ("req-123", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_trace_id(header: str | None, expected: str | None) -> None:
    assert parse_trace_id(header) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["congo=t61rcWkgMzE"], "congo=t61rcWkgMzE"),
        (["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (["rojo=1", "congo=2"], "rojo=1,congo=2"),  # several fields combine
        (["rojo=1 , ,congo=2"], "rojo=1,congo=2"),  # whitespace and empty members
        (["tenant@vendor=x"], "tenant@vendor=x"),
        (["Rojo=1"], None),  # keys are lowercase
        (["rojo"], None),
        (["rojo=a=b"], None),
        (["rojo="], None),
        ([",".join(f"k{i}=v" for i in range(33))], None),  # more than 32 members
        (["a=1,b=2,a=3"], None),  # a key twice
        (["k=" + "v" * (MAX_TRACESTATE - 1)], None),  # a value over 256 characters
        # 513 characters: the last long member goes first, the short ones stay whole.
        (["a=1", "b=" + "v" * 250, "c=" + "v" * 250, "d=2"], "a=1,b=" + "v" * 250 + ",d=2"),
        ([""], None),
    ],
)
def test_parse_tracestate(values: list[str], expected: str | None) -> None:
    assert parse_tracestate(values) == expected


hex_id = st.integers(min_value=1, max_value=2**128 - 1).map(lambda n: f"{n:032x}")
span_id = st.integers(min_value=1, max_value=2**64 - 1).map(lambda n: f"{n:016x}")


@given(hex_id, span_id, st.integers(min_value=0, max_value=255))
def test_valid_traceparent_round_trips(trace: str, span: str, flags: int) -> None:
    assert parse_traceparent(f"00-{trace}-{span}-{flags:02x}") == (trace, span, f"{flags:02x}")


@pytest.mark.parametrize(
    ("received", "sent"), [("00", "00"), ("01", "01"), ("02", "02"), ("03", "03"), ("ff", "03"), ("05", "01")]
)
def test_only_defined_flags_are_propagated(received: str, sent: str) -> None:
    assert propagated_flags(received) == sent


@given(st.text(max_size=80))
def test_traceparent_parser_never_accepts_malformed_ids(text: str) -> None:
    parsed = parse_traceparent(text)
    if parsed is not None:
        trace, span, flags = parsed
        assert HEX32.match(trace) and trace != "0" * 32
        assert HEX16.match(span) and span != "0" * 16
        assert re.fullmatch("[0-9a-f]{2}", flags)


@given(st.one_of(st.text(max_size=40), st.uuids().map(str), hex_id))
def test_trace_id_parser_yields_only_w3c_ids(text: str) -> None:
    parsed = parse_trace_id(text)
    if parsed is not None:
        assert HEX32.match(parsed) and parsed != "0" * 32


@given(st.uuids())
def test_every_uuid_is_accepted_in_either_case(value: object) -> None:
    text = str(value)
    expected = None if text == "00000000-0000-0000-0000-000000000000" else text.replace("-", "")
    assert parse_trace_id(text) == expected
    assert parse_trace_id(text.upper()) == expected


def test_generated_ids_are_valid() -> None:
    for _ in range(100):
        assert parse_trace_id(new_trace_id()) is not None
        assert HEX16.match(new_span_id())


# --- the stage, in process -------------------------------------------------------------------


async def test_valid_traceparent_is_continued(aiohttp_client, upstream: RecordingUpstream) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    response = await seen.client.get(
        "/x",
        headers={"traceparent": f"00-{TRACE}-{SPAN}-00", "tracestate": "rojo=1,congo=2"},
    )
    assert response.status == 200
    assert response.headers["X-Trace-Id"] == TRACE
    sent = upstream.received[0]
    assert sent.header("X-Trace-Id") == TRACE
    version, trace, parent, flags = (sent.header("traceparent") or "").split("-")
    assert (version, trace, flags) == ("00", TRACE, "00")  # unsampled stays unsampled
    assert parent != SPAN and HEX16.match(parent)
    assert sent.header("tracestate") == "rojo=1,congo=2"
    [line] = await seen.lines.wait_for(1)
    assert (line["trace_id"], line["span_id"], line["trace_flags"]) == (TRACE, parent, "00")
    assert line["trace.replaced"] is None


async def test_undefined_flag_bits_are_cleared_upstream(aiohttp_client, upstream: RecordingUpstream) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    await seen.client.get("/x", headers={"traceparent": f"00-{TRACE}-{SPAN}-ff"})
    assert (upstream.received[0].header("traceparent") or "").endswith("-03")
    [line] = await seen.lines.wait_for(1)
    assert line["trace_flags"] == "03"


@pytest.mark.parametrize(
    ("headers", "replaced"),
    [
        ({"traceparent": f"00-{TRACE.upper()}-{SPAN}-01", "tracestate": "a=1"}, ["traceparent", "tracestate"]),
        ({"traceparent": "garbage", "X-Trace-Id": "not-hex"}, ["traceparent", "x-trace-id"]),
        ({"X-Trace-Id": "0" * 32}, ["x-trace-id"]),
        ({"tracestate": "a=1"}, ["tracestate"]),
    ],
)
async def test_invalid_trace_headers_are_replaced_and_recorded(
    aiohttp_client, upstream: RecordingUpstream, headers: dict[str, str], replaced: list[str]
) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    response = await seen.client.get("/x", headers=headers)
    trace_id = response.headers["X-Trace-Id"]
    assert HEX32.match(trace_id) and trace_id != TRACE
    sent = upstream.received[0]
    assert sent.header("X-Trace-Id") == trace_id
    assert (sent.header("traceparent") or "").split("-")[1] == trace_id
    assert sent.header("tracestate") is None
    [line] = await seen.lines.wait_for(1)
    assert line["trace_id"] == trace_id
    assert line["trace.replaced"] == replaced


async def test_oversized_tracestate_is_dropped_with_a_valid_traceparent(
    aiohttp_client, upstream: RecordingUpstream
) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    await seen.client.get(
        "/x", headers={"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "k=" + "v" * 600}
    )
    assert upstream.received[0].header("tracestate") is None
    assert upstream.received[0].header("X-Trace-Id") == TRACE
    [line] = await seen.lines.wait_for(1)
    assert line["trace.replaced"] == ["tracestate"]


async def test_uuid_trace_id_is_normalised_and_request_id_passes_untouched(
    aiohttp_client, upstream: RecordingUpstream
) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    request_id = "Req-42 / \"quoted\""
    response = await seen.client.get(
        "/x",
        headers={"X-Trace-Id": "4BF92F35-77B3-4DA6-A3CE-929D0E0E4736", "X-Request-Id": request_id},
    )
    assert response.headers["X-Trace-Id"] == TRACE
    sent = upstream.received[0]
    assert sent.header("X-Trace-Id") == TRACE
    assert (sent.header("traceparent") or "").startswith(f"00-{TRACE}-")
    assert [v for k, v in sent.headers if k.lower() == "x-request-id"] == [request_id]
    assert "X-Request-Id" not in response.headers  # not invented on the way back
    [line] = await seen.lines.wait_for(1)
    assert line["http.request.header.x-request-id"] == request_id
    assert line["trace.replaced"] is None


async def test_proxy_errors_carry_the_callers_trace_id(aiohttp_client, upstream: RecordingUpstream) -> None:
    config = base_config(upstream.url)
    config["routes"] = [{"name": "api", "match": {"path_prefix": "/api"}, "upstream": "app"}]
    config["limits"] = {"max_request_body": "10B"}
    seen = await observe(aiohttp_client, config)
    parent = {"traceparent": f"00-{TRACE}-{SPAN}-01"}
    for method, path, data in (("GET", "/nowhere", None), ("POST", "/api", b"x" * 11)):
        response = await seen.client.request(method, path, headers=parent, data=data)
        assert response.status in (404, 413)
        assert response.headers["X-Trace-Id"] == TRACE
        assert (await response.json())["trace_id"] == TRACE


# --- end to end through a real process --------------------------------------------------------


async def test_trace_id_survives_client_proxy_upstream_log_response(
    proxy_process, upstream: RecordingUpstream
) -> None:
    process = proxy_process(base_config(upstream.url))
    async with ClientSession() as session, session.get(
        process.url + "/orders/7",
        headers={"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "rojo=1"},
    ) as response:
        assert response.status == 200
        assert response.headers["X-Trace-Id"] == TRACE
    sent = upstream.received[0]
    assert sent.header("X-Trace-Id") == TRACE
    _, trace, proxy_span, flags = (sent.header("traceparent") or "").split("-")
    assert (trace, flags) == (TRACE, "01")
    assert sent.header("tracestate") == "rojo=1"

    def logged() -> dict[str, object] | None:
        return next((line for line in process.json_lines() if line.get("url.path") == "/orders/7"), None)

    line = wait_until(logged, 5, "the access log line")
    assert (line["trace_id"], line["span_id"]) == (TRACE, proxy_span)
    assert line["http.response.status_code"] == 200
