"""RFC 8785 (JSON Canonicalization Scheme) for request fingerprints: the rules, numbers, and the
orjson path for bounded pieces. jcs_stream.py walks whole documents in bounded memory.

What counts as the same JSON: RFC 8785. It is defined for I-JSON (RFC 7493) only, so:
- duplicate object names, numbers that a double cannot hold exactly (1E400, 2**53 + 1,
  333333333.33333329) and object names containing U+0000 make a document `NotCanonical`: the
  caller then fingerprints its exact bytes, so it only ever equals itself byte for byte, never
  its de-duplicated or rounded twin;
- nesting deeper than the configured depth raises `JsonTooDeep` (a 4xx, never a 500).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

import orjson


class NotCanonical(ValueError):
    """Not JSON, or JSON outside I-JSON: fingerprint the exact bytes instead."""


class JsonTooDeep(ValueError):
    def __init__(self, max_depth: int) -> None:
        super().__init__(f"the JSON body nests deeper than {max_depth} levels")


# Integers of up to 15 digits (and a sign) are exact doubles, canonical as written.
_SHORT_INT = 15
_MINUS = ord("-")

# orjson parses and re-serialises bounded pieces of a body (1 KiB in a few us, against tens of
# us for the tokenizer); its output is RFC 8785's exactly, with floats re-laid-out, unless one of
# the signs below shows up, and then the tokenizer decides. A piece is at most FAST_MAX bytes, so
# its Python objects cost a few MiB at most, whatever its shape.
FAST_MAX = 64 * 1024
# Where orjson's key order (code points) can differ from RFC 8785's (UTF-16 code units): a
# name with a character from U+E000 up, raw (UTF-8 lead bytes EE-F4) or escaped, and an escaped
# U+0000, which the tokenizer refuses in names. A name is a string followed by ':', so each
# pattern runs from the sign to the end of its string (only a value would stop earlier); an
# escape that is really an escaped backslash plus "u..." may match too, which only costs speed.
_STRING_REST = rb'(?:[^"\\]|\\.)*+"[ \t\n\r]*+:'
_HIGH_NAME = re.compile(rb"[\xee-\xf4]" + _STRING_REST)
_RISKY_NAME_ESCAPE = re.compile(rb"\\u(?:[dDeEfF]|0000)" + _STRING_REST)
# An escaped ':' anywhere would upset the duplicate-name count below.
_ESCAPED_COLON = re.compile(rb"\\u003[aA]")
# Cheap signs are looked for in a copy with every digit turned into "0" and "E" into "e"
# (bytes.translate and `in` are many times faster than a regex here). Strings can show them too;
# then a closer look decides, or the tokenizer does: a false sign only costs time.
_SHAPE = bytes.maketrans(b"123456789E", b"000000000e")
# A number that a double may not hold exactly has 16+ digits or a 3-digit exponent; with neither,
# every number has at most 15 significant digits in a double's normal range, so it is exact.
_BARE_NUMBER = re.compile(rb"-?[0-9][-+.eE0-9]*")
_ANY_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
# orjson writes floats as ECMAScript does except integral ones and exponent forms; those are
# re-laid-out token by token.
_POINT_ZERO = re.compile(rb"\.0(?![0-9])")
_OUTPUT_TOKEN = re.compile(rb'("[^"\\]*+(?:\\.[^"\\]*+)*+")|[-0-9][-+.e0-9]*')
# For the depth of a small body: its brackets outside strings, all as [ and ].
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _maybe_inexact(shape: bytes) -> bool:
    """Signs of an inexact number in a _SHAPE copy (signs and points do not break a run)."""
    shape = shape.translate(None, b"+-.")
    return b"0000000000000000" in shape or b"e000" in shape


def _inexact(piece: bytes) -> bool:
    """Whether a number outside the piece's strings is not exactly a double (see exact())."""
    bare = _outside_strings(piece)
    if not _maybe_inexact(bare.translate(_SHAPE)):
        return False
    for match in _BARE_NUMBER.finditer(bare):
        token = match.group()
        if _maybe_inexact(token.translate(_SHAPE)) and not exact(token):
            return True
    return False


def _needs_relayout(canonical: bytes) -> bool:
    """Whether a float may be written differently from ECMAScript: orjson's floats match it
    digit for digit except integral ones (`100.0`) and exponent forms (`1e+16`, `1e-6`)."""
    if b"." not in canonical and b"e+" not in canonical and b"e-" not in canonical:
        return False  # the usual case, found without a copy
    shape = canonical.translate(_SHAPE)
    return b"0e+" in shape or b"0e-" in shape or _POINT_ZERO.search(canonical) is not None


def _relayout(match: re.Match[bytes]) -> bytes:
    token = match.group()
    if match.lastindex or (b"." not in token and b"e" not in token):
        return token  # a string or an integer
    return es_number(float(token)).encode()


def via_orjson(piece: bytes) -> bytes | None:
    """The RFC 8785 form of the JSON text `piece` via orjson, or None: use the tokenizer."""
    if not piece.isascii() and _HIGH_NAME.search(piece) is not None:
        return None
    if b"\\u" in piece and (
        _RISKY_NAME_ESCAPE.search(piece) is not None or _ESCAPED_COLON.search(piece) is not None
    ):
        return None
    shape = piece.translate(_SHAPE)
    long_numbers = _maybe_inexact(shape)
    if long_numbers and _inexact(piece):
        return None
    try:
        canonical = orjson.dumps(orjson.loads(piece), option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return None
    # orjson keeps the last of duplicate names; the piece's colons (names, and colons in strings,
    # none escaped) then outnumber the canonical text's.
    if piece.count(b":") != canonical.count(b":"):
        return None
    # orjson makes floats of the piece's numbers with a point or an exponent (a digit before
    # either) and of integers beyond 64 bits.
    if (long_numbers or b"0." in shape or b"0e" in shape) and _needs_relayout(canonical):
        canonical = _OUTPUT_TOKEN.sub(_relayout, canonical)
    return canonical


def fast(data: bytes, max_depth: int) -> bytes | None:
    """The whole body via orjson if it is small, or None."""
    if len(data) > FAST_MAX:
        return None
    if data.count(b"[") + data.count(b"{") > max_depth and _deeper_than(data, max_depth):
        return None  # the tokenizer raises JsonTooDeep, or says why it is not JSON
    return via_orjson(data)


def _deeper_than(data: bytes, max_depth: int) -> bool:
    """Whether the brackets outside strings nest deeper than max_depth (or do not balance).
    Each round deletes the innermost pairs, so a body needs as many rounds as it is deep."""
    brackets = _outside_strings(data).translate(_ONE_BRACKET, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _outside_strings(data: bytes) -> bytes:
    """What is outside the strings of valid JSON (garbage, never an error, for invalid JSON)."""
    if b'\\"' not in data:  # no escaped quote: strings are exactly every other piece
        return b"".join(data.split(b'"')[::2])
    return _ANY_STRING.sub(b"", data)


def es_number(value: float) -> str:
    """ECMAScript Number::toString for a finite double (RFC 8785 section 3.2.2.3)."""
    if value == 0:
        return "0"  # -0 too
    if value < 0:
        return "-" + es_number(-value)
    # repr() gives the shortest round-trip digits, as ECMAScript requires; only the layout differs.
    mantissa, _, exp = repr(value).partition("e")
    whole, _, frac = mantissa.partition(".")
    all_digits = whole + frac.rstrip("0") if frac != "0" else whole
    digits = all_digits.lstrip("0")
    n = len(whole) + int(exp or 0) - (len(all_digits) - len(digits))
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    sign = "+" if n > 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(n - 1)}"


def exact(text: bytes) -> bool:
    """Whether the JSON number `text` is the same number as its nearest double (written the
    shortest way); if not, the double would merge it with its neighbours."""
    try:
        value = float(text)
    except ValueError:  # a loose token from _inexact(), not a JSON number
        return False
    return math.isfinite(value) and Decimal(text.decode()) == Decimal(repr(value))


def number(match: re.Match[bytes]) -> bytes:
    """The canonical form of a number matched by jcs_stream's number pattern."""
    text = match.group()
    if match.lastindex is None and len(text) - (text[0] == _MINUS) <= _SHORT_INT:
        return b"0" if text == b"-0" else text
    if not exact(text):
        raise NotCanonical("a number that a double cannot hold exactly")
    return es_number(float(text)).encode()
