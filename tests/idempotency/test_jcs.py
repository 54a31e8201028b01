"""RFC 8785 canonical JSON for fingerprints: the RFC's vectors, an independent reference
implementation compared over generated documents and serialisations, the I-JSON refusals
(duplicates, inexact numbers), the depth limit, and the orjson path agreeing with the tokenizer."""

from __future__ import annotations

import json
import struct
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.idempotency import jcs, jcs_stream
from proxy.idempotency.jcs import JsonTooDeep, NotCanonical, es_number

# RFC 8785 appendix B: IEEE-754 bits -> ECMAScript serialisation.
NUMBER_VECTORS = {
    0x0000000000000000: "0",
    0x8000000000000000: "0",
    0x0000000000000001: "5e-324",
    0x8000000000000001: "-5e-324",
    0x7FEFFFFFFFFFFFFF: "1.7976931348623157e+308",
    0xFFEFFFFFFFFFFFFF: "-1.7976931348623157e+308",
    0x4340000000000000: "9007199254740992",
    0xC340000000000000: "-9007199254740992",
    0x4430000000000000: "295147905179352830000",
    0x44B52D02C7E14AF5: "9.999999999999997e+22",
    0x44B52D02C7E14AF6: "1e+23",
    0x44B52D02C7E14AF7: "1.0000000000000001e+23",
    0x444B1AE4D6E2EF4E: "999999999999999700000",
    0x444B1AE4D6E2EF4F: "999999999999999900000",
    0x444B1AE4D6E2EF50: "1e+21",
    0x3EB0C6F7A0B5ED8C: "9.999999999999997e-7",
    0x3EB0C6F7A0B5ED8D: "0.000001",
    0x41B3DE4355555553: "333333333.3333332",
    0x41B3DE4355555554: "333333333.33333325",
    0x41B3DE4355555555: "333333333.3333333",
    0x41B3DE4355555556: "333333333.3333334",
    0x41B3DE4355555557: "333333333.33333343",
    0xBECBF647612F3696: "-0.0000033333333333333333",
    0x43143FF3C1CB0959: "1424953923781206.2",
}


def stream(body: bytes, max_depth: int = 128) -> bytes:
    out = bytearray()
    jcs_stream.canonicalise(body, out.extend, max_depth)
    return bytes(out)


def tokenizer_only(body: bytes, max_depth: int = 128) -> bytes:
    """The tokenizer without orjson pieces."""
    saved = jcs_stream.PIECE_DEPTH
    jcs_stream.PIECE_DEPTH = 0
    try:
        return stream(body, max_depth)
    finally:
        jcs_stream.PIECE_DEPTH = saved


def either(body: bytes, max_depth: int = 128) -> bytes:
    """What the fingerprint hashes: the whole-body orjson path, else the tokenizer."""
    fast = jcs.fast(body, max_depth)
    return fast if fast is not None else stream(body, max_depth)


# --- an independent reference: json module, explicit rules ------------------------------------


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names) or any("\0" in name for name in names):
        raise NotCanonical("duplicate or NUL name")
    return dict(pairs)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")) or Decimal(text) != Decimal(repr(value)):
        raise NotCanonical("inexact")
    return value


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t"}


def _ref_string(text: str) -> str:
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 else c) for c in text
    ) + '"'


def _ref(value: Any) -> str:
    if isinstance(value, dict):
        names = sorted(value, key=lambda name: name.encode("utf-16-be"))
        return "{" + ",".join(_ref_string(n) + ":" + _ref(value[n]) for n in names) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_ref(v) for v in value) + "]"
    if isinstance(value, str):
        return _ref_string(value)
    if value is True or value is False or value is None:
        return json.dumps(value)
    return es_number(float(value))


def reference(body: bytes) -> bytes:
    try:
        value = json.loads(body, object_pairs_hook=_pairs, parse_float=_float,
                           parse_int=_float, parse_constant=_float)
    except (ValueError, RecursionError) as exc:
        raise NotCanonical(str(exc)) from None
    return _ref(value).encode()


def outcome(function: Any, body: bytes) -> bytes | str:
    try:
        return bytes(function(body))
    except NotCanonical:
        return "not canonical"


# --- vectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "expected"), NUMBER_VECTORS.items())
def test_rfc8785_number_vectors(bits: int, expected: str) -> None:
    value = struct.unpack(">d", struct.pack(">Q", bits))[0]
    assert es_number(value) == expected
    assert stream(f"[{expected}]".encode()) == f"[{expected}]".encode()


def test_rfc8785_section_3_2_2_example() -> None:
    # The RFC's input, except 333333333.33333329: a double cannot hold it, see the next test.
    body = (b'{"numbers": [333333333.3333333, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
            b' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
            b' "literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,'
                '1e-27],"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}').encode()
    assert stream(body) == expected == either(body)


def test_rfc8785_sort_order_is_utf16_code_units() -> None:
    body = (b'{"\\u20ac":"Euro Sign","\\r":"Carriage Return","\\ufb33":"Hebrew Letter Dalet With '
            b'Dagesh","1":"One","\\ud83d\\ude00":"Emoji: Grinning Face","\\u0080":"Control",'
            b'"\\u00f6":"Latin Small Letter O With Diaeresis"}')
    names = [name for name in json.loads(stream(body))]
    assert names == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    # Raw UTF-8 names too, where code point order (orjson's) would put U+E000 first.
    raw = '{"\ue000":1,"\U0001f600":2}'.encode()
    assert list(json.loads(either(raw))) == ["\U0001f600", "\ue000"]


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b"[-0, -0.0, 0e5, -0E-3]", b"[0,0,0,0]"),
        (b"[1e21, 1E-7, 1e-6, 100, 1.5e2, 100.0, 1e20]",
         b"[1e+21,1e-7,0.000001,100,150,100,100000000000000000000]"),
        (b"[9007199254740992, 1000000000000000000000]", b"[9007199254740992,1e+21]"),
        (b'"\\u007f\\u2028\\/"', '"\x7f\u2028/"'.encode()),
        (b' { "b" : [ ] , "a" : { } } ', b'{"a":{},"b":[]}'),
    ],
)
def test_numbers_strings_and_whitespace(body: bytes, canonical: bytes) -> None:
    assert stream(body) == canonical == either(body) == reference(body)


@pytest.mark.parametrize(
    "body",
    [
        b"[1E400]", b"[-1e400]", b"[1e-400]",  # beyond a double
        b"[9007199254740993]", b"[333333333.33333329]", b"[0.1000000000000000055511151231257827]",
        b'{"a":1,"a":1}', b'{"a":1,"b":2,"a":1}', b'[{"x":{"a":1,"a":2}}]',  # duplicate names
        b'{"\\u0061":1,"a":2}',  # the same name, escaped once
        b'{"\\u0000":1}',
        b"{not json", b"[1,]", b"01", b"[] x", b'"\\ud800"', b"\xff", b"\xef\xbb\xbf[]", b"",
        b"[NaN]", b'{"a":1', b"[1 2]", b"[[1,]]",
        b"[1234567890123456-1]", b'{"a":[12345678901234567e+-1]}',  # number-like, not numbers
    ],
)
def test_not_ijson_is_not_canonical(body: bytes) -> None:
    assert jcs.fast(body, 128) is None
    with pytest.raises(NotCanonical):
        stream(body)
    with pytest.raises(NotCanonical):
        tokenizer_only(body)


def test_duplicates_are_not_canonical_inside_large_bodies_too() -> None:
    filler = b'"' + b"x" * (jcs.FAST_MAX + 10) + b'"'
    for body in (b'{"f":' + filler + b',"a":1,"a":1}', b'[' + filler + b',{"a":1,"a":2}]'):
        with pytest.raises(NotCanonical):
            stream(body)


# --- depth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
@pytest.mark.parametrize("pad", [0, jcs.FAST_MAX])
def test_depth_limit_is_exact_on_every_path(opener: bytes, pad: int) -> None:
    closer = b"]" if opener == b"[" else b"}"
    filler = b'"' + b"x" * pad + b'"'

    def nested(depth: int) -> bytes:
        return opener * depth + filler + closer * depth

    for limit in (1, 5, 128, 300):
        assert either(nested(limit), limit)
        assert tokenizer_only(nested(limit), limit)
        with pytest.raises(JsonTooDeep):
            either(nested(limit + 1), limit)
        with pytest.raises(JsonTooDeep):
            tokenizer_only(nested(limit + 1), limit)


@pytest.mark.parametrize("decoy", [b'"]]]]"', b'"\\"]]]]"', b'"\\\\"', b'"[[[["'])
def test_brackets_in_strings_do_not_hide_depth(decoy: bytes) -> None:
    body = b"[" + decoy + b"," + b"[" * 128 + b"]" * 128 + b"]"
    with pytest.raises(JsonTooDeep):
        either(body, 128)
    shallow = b"[" + decoy + b"," + b"[" * 127 + b"]" * 127 + b"]"
    assert either(shallow, 128) == reference(shallow)


def test_deep_nesting_far_beyond_the_limit_raises_no_recursion_error() -> None:
    with pytest.raises(JsonTooDeep):
        stream(b"[" * 100_000 + b"]" * 100_000, 128)
    assert stream(b"[" * 5000 + b"]" * 5000, 10_000).count(b"[") == 5000


# --- generated documents: reference, serialisations, paths -----------------------------------

names = st.text(max_size=4) | st.sampled_from(["a", "b", "aa", "\ue000", "\U0001f600", "\x7f"])
scalars = (
    st.none() | st.booleans() | st.text(max_size=6)
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=25,
)


def serialisations(value: Any) -> list[bytes]:
    return [
        json.dumps(value).encode(),
        json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True).encode(),
        json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(),
        orjson.dumps(value),
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_every_path_matches_the_reference(value: Any) -> None:
    results = set()
    for body in serialisations(value):
        expected = outcome(reference, body)
        assert outcome(stream, body) == expected
        assert outcome(tokenizer_only, body) == expected
        fast = jcs.fast(body, 128)
        assert fast is None or fast == expected
        results.add(expected)
    assert len(results) == 1  # re-serialising never changes what the request is


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(documents, min_size=1, max_size=6))
def test_large_bodies_pieces_agree_with_the_reference(values: list[Any]) -> None:
    # Long enough that the whole-body path is skipped and pieces meet their window edge.
    body = json.dumps({"pad": "p" * (jcs.FAST_MAX - 100), "items": values}).encode()
    assert outcome(stream, body) == outcome(reference, body)


def test_canonical_text_canonicalises_to_itself() -> None:
    # So bytes hashed as received (not canonical) can never equal a canonical text.
    body = b'{"b":[1e21,0.5,-3,"\\u0001\xc3\xa9"],"a":{"\xf0\x9f\x98\x80":null,"\xee\x80\x80":1}}'
    once = stream(body)
    assert stream(once) == once == either(once)


@pytest.mark.parametrize("shift", range(-8, 9))
@pytest.mark.parametrize("scalar", [b"1.5000000", b"true", b"-12345", b'"abcdef"', b"{}"])
def test_a_value_cut_by_the_piece_window_is_not_taken_for_a_shorter_one(
    shift: int, scalar: bytes
) -> None:
    head = b'{"pad":"' + b"p" * (jcs.FAST_MAX // 2) + b'","run":['
    ones = b"1," * ((jcs.FAST_MAX - shift) // 2)
    body = head + ones + scalar + b",7]}"
    assert stream(body) == reference(body)
    long_number = b"[" + ones + b"0.5" + b"0" * (jcs.FAST_MAX + shift) + b"1]"
    assert outcome(stream, long_number) == outcome(reference, long_number)


@pytest.mark.parametrize(
    "body",
    [
        b'{"amount": 1299, "currency": "eur", "meta": {"b": [1, 2], "a": null}}',
        b'{"rate": 0.125, "fee": 1.5, "total": 100.0, "tiny": 1e-7, "big": 1e21}',
        '{"description": "paid \U0001f600 \ue000", "a": 1}'.encode(),
        b'{"html": "\\u003cb\\u003e \\ud83d\\ude00", "card": "4242424242424242"}',
        json.dumps([{"id": i, "name": f"n{i}"} for i in range(300)]).encode(),  # > 128 brackets
    ],
)
def test_typical_bodies_take_the_orjson_path(body: bytes) -> None:
    """Speed, not meaning: these must not fall back to the tokenizer (~10x slower)."""
    assert jcs.fast(body, 128) == reference(body)
