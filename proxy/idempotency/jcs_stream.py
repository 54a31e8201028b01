"""Canonicalise a whole JSON document (RFC 8785, see jcs.py) into a hash in bounded memory.

A tokenizer walks the bytes with an explicit stack and never builds Python objects for the whole
document. Arrays and scalars stream straight out (to `write`, a hash's `update`); only the
members of open objects are held, one bytearray each (sort key + canonical bytes), until their
object closes and they can be sorted. Runs of small array elements and small member values (up to
jcs.FAST_MAX bytes and PIECE_DEPTH levels) go through orjson in one piece, so the Python loop
sees the big structure only.

Memory beyond the body: about the canonical size of the open objects plus ~64 bytes per held
member, capped by MAX_HELD_MEMBERS (beyond it the document is NotCanonical and hashed as sent),
plus one piece's orjson objects (a few MiB at most).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from typing import cast

import orjson

from proxy.idempotency.jcs import FAST_MAX, JsonTooDeep, NotCanonical, number, via_orjson

_WS = re.compile(rb"[ \t\n\r]*")


# Where canonical bytes go: a hash's update().
Write = Callable[[bytes | bytearray | memoryview], object]


def _skip(data: bytes, pos: int) -> int:
    """Past the whitespace at pos (the pattern matches anywhere, if only nothing)."""
    return cast("re.Match[bytes]", _WS.match(data, pos)).end()


# A string without escapes (its bytes are already canonical once they are valid UTF-8) ...
_PLAIN_STRING = re.compile(rb'"[^"\\\x00-\x1f]*"')
# ... and one with escapes, decoded and re-encoded by orjson (whose string escaping is exactly
# ECMAScript's JSON.stringify: \b \t \n \f \r \" \\ and lowercase \u00xx for other controls).
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
_OPEN_OBJECT, _OPEN_ARRAY = ord("{"), ord("[")
_CLOSE_OBJECT, _CLOSE_ARRAY, _COMMA, _COLON, _QUOTE = (ord(c) for c in '}],:"')
# Between an object member's sort key (UTF-16BE code units, so bytewise order is RFC 8785's
# order) and its canonical bytes. Unambiguous at an even offset because U+0000 is refused in names.
_SEP = b"\0\0"
# Canonical bytes of top-level arrays go to `write` in pieces of about this size.
_FLUSH = 64 * 1024
# Members held in open objects at once: ~64 bytes of Python overhead each, so about 8 MiB.
MAX_HELD_MEMBERS = 1 << 17

# A value up to PIECE_DEPTH containers deep, found by a regex that is loose about everything but
# where the value ends (it even lets `[` close with `}`): orjson checks the rest. Atomic groups,
# so no backtracking into a value; one copy of the inner pattern per level.
PIECE_DEPTH = 16
_P_WS = rb"[ \t\n\r]*+"
_P_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
# A number or literal must be followed by a delimiter inside the window: one cut by the window's
# end would otherwise pass as a shorter number.
_P_SCALAR = _P_STRING + rb"|[-+.0-9a-zA-Z]++(?=[ \t\n\r,\]}:])"


def _value_pattern(depth: int) -> bytes:
    value = rb"(?>" + _P_SCALAR + rb")"
    for _ in range(depth):
        value = (
            rb"(?>" + _P_SCALAR + rb"|[\[{]" + _P_WS + rb"(?:(?:" + _P_STRING + _P_WS + rb":"
            + _P_WS + rb")?" + value + _P_WS + rb",?" + _P_WS + rb")*+[\]}])"
        )
    return value


# By how deep a piece may nest where it starts: (single value, run of array elements).
_PIECES = [
    (re.compile(value), re.compile(value + rb"(?:" + _P_WS + rb"," + _P_WS + value + rb")*+"))
    for value in map(_value_pattern, range(PIECE_DEPTH + 1))
]


def _string(data: bytes, pos: int) -> tuple[str | None, bytes | memoryview, int]:
    """(decoded text if it had escapes, canonical bytes, end) of the string starting at pos.

    The document's UTF-8 was checked up front, so a string without escapes is canonical as is.
    """
    match = _PLAIN_STRING.match(data, pos)
    if match is not None:
        end = match.end()
        return None, memoryview(data)[pos:end], end
    match = _STRING.match(data, pos)
    if match is None:
        raise NotCanonical("a malformed string")
    try:
        text = orjson.loads(match.group())  # checks escapes and surrogate pairs
    except orjson.JSONDecodeError:
        raise NotCanonical("a malformed string") from None
    return text, orjson.dumps(text), match.end()


def _check_utf8(data: bytes) -> None:
    """Refuse a document that is not UTF-8, in pieces so no str of the whole body is built."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for start in range(0, len(data), _FLUSH):
            decoder.decode(view[start:start + _FLUSH])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise NotCanonical("not UTF-8") from None


def _name(data: bytes, pos: int) -> tuple[bytearray, int]:
    """A new member record started with its name's sort key and canonical `"name":`."""
    if pos >= len(data) or data[pos] != _QUOTE:
        raise NotCanonical("an object name must be a string")
    text, canonical, end = _string(data, pos)
    if text is None:
        text = str(canonical[1:-1], "utf-8")
    if "\0" in text:
        raise NotCanonical("an object name containing U+0000")
    record = bytearray(text.encode("utf-16-be", "surrogatepass"))
    record += _SEP
    record += canonical
    end = _skip(data, end)
    if end >= len(data) or data[end] != _COLON:
        raise NotCanonical("expected ':' after an object name")
    record.append(_COLON)
    return record, _skip(data, end + 1)


def _split(member: bytearray) -> int:
    """Where a member record's sort key ends (the separator at an even offset)."""
    split = member.find(_SEP)
    while split & 1:
        split = member.find(_SEP, split + 1)
    return split


class _Object:
    """An open object: its finished members, and where its canonical bytes go once it closes."""

    __slots__ = ("members", "parent")

    def __init__(self, parent: bytearray) -> None:
        self.parent = parent
        self.members: list[bytearray] = []

    def close(self, write: Write | None
              ) -> bytearray:
        """Put the sorted members after the parent's bytes; return the buffer now holding them.

        With `write` (the parent is the top-level buffer) they go straight out, so a top-level
        object is never copied whole. Otherwise the first member's buffer is reused when it is the
        bigger one, so a large value is not copied once more per enclosing object.
        """
        members = self.members
        members.sort()  # sort key first: UTF-16 code unit order, a name's prefix sorts first
        members.reverse()  # popped in order below, so each member is freed once it is copied
        out = self.parent
        if write is not None:
            out.append(_OPEN_OBJECT)
            write(out)
            out.clear()
        previous = None
        first = True
        while members:
            member = members.pop()
            split = _split(member)
            key = member[:split]
            if key == previous:
                raise NotCanonical("duplicate object name")
            previous = key
            if write is not None:
                if not first:
                    write(b",")
                write(memoryview(member)[split + 2:])
            elif first and len(member) > len(out):
                member[:split + 2] = out + b"{"  # the parent's bytes replace the sort key
                out = member
            else:
                out.append(_OPEN_OBJECT if first else _COMMA)
                out += memoryview(member)[split + 2:]
            first = False
            del member
        if write is not None:
            write(b"}")
        else:
            out.append(_CLOSE_OBJECT)
        return out


class _Walk:
    """One document's tokenizer state; `run()` is the loop."""

    def __init__(self, data: bytes, write: Write, max_depth: int) -> None:
        self.data = data
        self.write = write
        self.max_depth = max_depth
        # Pieces are not tried again inside a region that orjson declined (the tokenizer does
        # it), so a region is never re-scanned. A body small enough to be one piece is here
        # because jcs.fast() declined it whole (or it is not JSON).
        self.declined_until = len(data) if len(data) <= FAST_MAX else 0
        self.held = 0

    def piece(self, run: bool, pos: int, depth: int) -> tuple[bytes | None, int]:
        """(canonical bytes, end) via orjson of the value (or run of array elements) at pos,
        which would be at nesting `depth`; or (None, pos)."""
        room = min(self.max_depth - depth, PIECE_DEPTH)
        if room <= 0 or pos < self.declined_until:
            return None, pos
        data = self.data
        match = _PIECES[room][run].match(data, pos, min(len(data), pos + FAST_MAX))
        if match is None:
            return None, pos
        end = match.end()
        canonical = via_orjson(b"[" + data[pos:end] + b"]" if run else data[pos:end])
        if canonical is None:
            self.declined_until = end
            return None, pos
        return (canonical[1:-1] if run else canonical), end

    def run(self) -> None:
        data, write, max_depth = self.data, self.write, self.max_depth
        size = len(data)
        top = bytearray()
        out = top  # where the value being parsed goes: `top`, or an open object member's record
        stack: list[_Object | None] = []  # None: an array
        pos = _skip(data, 0)
        while True:
            # --- one value at pos ---
            char = data[pos]
            if char in (_OPEN_OBJECT, _OPEN_ARRAY):
                canonical, end = self.piece(False, pos, len(stack))
                if canonical is not None:
                    out += canonical
                    pos = end
                else:
                    if len(stack) >= max_depth:
                        raise JsonTooDeep(max_depth)
                    pos = _skip(data, pos + 1)
                    closer = _CLOSE_OBJECT if char == _OPEN_OBJECT else _CLOSE_ARRAY
                    if data[pos] == closer:
                        out.append(char)
                        out.append(closer)
                        pos += 1
                    elif char == _OPEN_ARRAY:
                        stack.append(None)
                        out.append(char)
                        canonical, pos = self.piece(True, pos, len(stack))
                        if canonical is None:
                            continue
                        out += canonical
                    else:
                        stack.append(_Object(out))
                        out, pos = _name(data, pos)
                        continue
            elif char == _QUOTE:
                _, canonical_string, pos = _string(data, pos)
                out += canonical_string
            elif char in _LITERALS:
                literal = _LITERALS[char]
                if not data.startswith(literal, pos):
                    raise NotCanonical("not JSON")
                out += literal
                pos += len(literal)
            else:
                match = _NUMBER.match(data, pos)
                if match is None:
                    raise NotCanonical("not JSON")
                out += number(match)
                pos = match.end()
            # --- after a value: close containers until one expects another value ---
            while True:
                if out is top and len(top) >= _FLUSH:
                    write(top)
                    top.clear()
                pos = _skip(data, pos)
                if not stack:
                    if pos != size:
                        raise NotCanonical("data after the JSON document")
                    write(top)
                    return
                frame = stack[-1]
                char = data[pos]
                if frame is None:
                    if char == _COMMA:
                        out.append(_COMMA)
                        pos = _skip(data, pos + 1)
                        canonical, pos = self.piece(True, pos, len(stack))
                        if canonical is None:
                            break
                        out += canonical
                        continue
                    if char != _CLOSE_ARRAY:
                        raise NotCanonical("expected ',' or ']'")
                    out.append(_CLOSE_ARRAY)
                    stack.pop()
                    pos += 1
                else:
                    if char != _COMMA and char != _CLOSE_OBJECT:
                        raise NotCanonical("expected ',' or '}'")
                    frame.members.append(out)
                    self.held += 1
                    if self.held > MAX_HELD_MEMBERS:
                        raise NotCanonical("objects with too many members to hold at once")
                    if char == _COMMA:
                        out, pos = _name(data, _skip(data, pos + 1))
                        break
                    stack.pop()
                    self.held -= len(frame.members)
                    out = frame.close(write if frame.parent is top else None)
                    pos += 1


def canonicalise(data: bytes, write: Write, max_depth: int) -> None:
    """Feed the RFC 8785 form of the JSON document `data` to `write`.

    Raises NotCanonical (hash the raw bytes instead; `write` may have been called) or
    JsonTooDeep.
    """
    _check_utf8(data)
    try:
        _Walk(data, write, max_depth).run()
    except IndexError:  # ran off the end: a truncated document
        raise NotCanonical("truncated JSON") from None
