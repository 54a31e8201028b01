"""A memory-store record packed into one bytes object, which the garbage collector never walks.

Every full collection visits each object that a tracked container holds. With a record per
slotted instance, a million records made that pass take 640 ms; even a dict of a million
untracked tuples costs 75 ms (the collector still reads every value's header, a cache miss
each). A dict whose values are all bytes is never tracked at all, so the records cost a
collection nothing (measured in docs/performance.md, "Stored records").

Layout: a fixed head, the owner token, the fingerprint, the stored headers (marshal, C-speed
both ways) and the body. Lowercase hex strings (the stage's owner tokens and fingerprints) are
kept as their raw bytes, half their text; anything else as UTF-8.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Sequence
from typing import NamedTuple

from proxy.stores.base import Record, RecordState, StoredResponse

# state, flags, status, lease deadline (monotonic), created (epoch), expires (monotonic), holder
# (an index into the store's table of holders: one per process, not one per record), and the
# lengths of the token, the fingerprint and the stored headers. Little-endian, no padding.
_HEAD = struct.Struct("<BBHdddIHHI")
_EXPIRES = struct.Struct("<d")
_EXPIRES_AT = struct.calcsize("<BBHdd")  # after the state, flags, status, lease and created
_STATES = (RecordState.IN_FLIGHT, RecordState.COMPLETED, RecordState.INDETERMINATE)
_CODES = {state: code for code, state in enumerate(_STATES)}
_COMPLETED_CODE = _CODES[RecordState.COMPLETED]  # read per request: a global (memory.py)
# flags
_RESPONSE, _REPLAYABLE, _TOKEN_HEX, _FINGERPRINT_HEX = 1, 2, 4, 8
_HEX_DIGITS = "0123456789abcdef"


class Fields(NamedTuple):
    """What the store's decisions read from a record."""

    state: RecordState
    token: str
    lease_until: float
    expires: float


def _raw(text: str, flag: int) -> tuple[int, bytes]:
    # strip() leaves nothing only when every character is a lowercase hex digit: such a string
    # comes back unchanged from bytes.hex().
    if len(text) % 2 == 0 and not text.strip(_HEX_DIGITS):
        return flag, bytes.fromhex(text)
    return 0, text.encode()


def _text(raw: bytes, hexed: int) -> str:
    return raw.hex() if hexed else raw.decode()


def new(token: str, fingerprint: str, lease_until: float, holder: int, created: float,
        expires: float) -> bytes:
    """An in-flight record."""
    token_flag, token_raw = _raw(token, _TOKEN_HEX)
    fp_flag, fp_raw = _raw(fingerprint, _FINGERPRINT_HEX)
    head = _HEAD.pack(0, token_flag | fp_flag, 0, lease_until, created, expires, holder,
                      len(token_raw), len(fp_raw), 0)
    return b"".join((head, token_raw, fp_raw))


def fields(blob: bytes) -> Fields:
    state, flags, _, lease_until, _, expires, _, token_len, _, _ = _HEAD.unpack_from(blob)
    start = _HEAD.size
    token = _text(blob[start : start + token_len], flags & _TOKEN_HEX)
    return Fields(_STATES[state], token, lease_until, expires)


def expires(blob: bytes) -> float:
    value: float = _EXPIRES.unpack_from(blob, _EXPIRES_AT)[0]
    return value


def payload(blob: bytes) -> int:
    """The stored response's bytes in the record: its headers and body (0 while none)."""
    *_, token_len, fp_len, _ = _HEAD.unpack_from(blob)
    return len(blob) - _HEAD.size - int(token_len) - int(fp_len)


def with_state(blob: bytes, state: RecordState) -> bytes:
    return bytes((_CODES[state],)) + blob[1:]


def headers_blob(headers: Sequence[tuple[str, str]]) -> bytes:
    """The stored form of a response's headers; its length is what they cost in the budget.
    str() turns a str subclass (which marshal refuses) into a plain str."""
    return marshal.dumps(tuple((str(name), str(value)) for name, value in headers))


def completed(blob: bytes, status: int, headers: bytes, body: bytes, replayable: bool,
              expires_at: float) -> bytes:
    """`blob` completed with a response (`headers` from headers_blob), kept until `expires_at`."""
    _, flags, _, lease_until, created, _, holder, token_len, fp_len, _ = _HEAD.unpack_from(blob)
    flags |= _RESPONSE | (_REPLAYABLE if replayable else 0)
    head = _HEAD.pack(_COMPLETED_CODE, flags, status, lease_until, created,
                      expires_at, holder, token_len, fp_len, len(headers))
    ids = blob[_HEAD.size : _HEAD.size + token_len + fp_len]
    return b"".join((head, ids, headers, body))


def record(blob: bytes, now: float, holders: Sequence[str], expired_now: bool = False) -> Record:
    """The Record the store protocol returns, with durations counted from `now`."""
    (state, flags, status, lease_until, created, expires_at, holder, token_len, fp_len,
     headers_len) = _HEAD.unpack_from(blob)
    at = _HEAD.size
    token = _text(blob[at : at + token_len], flags & _TOKEN_HEX)
    at += token_len
    fingerprint = _text(blob[at : at + fp_len], flags & _FINGERPRINT_HEX)
    at += fp_len
    response = None
    if flags & _RESPONSE:
        headers = marshal.loads(blob[at : at + headers_len]) if headers_len else ()
        body = blob[at + headers_len :]
        response = StoredResponse(status, headers, body, bool(flags & _REPLAYABLE))
    return Record(
        _STATES[state],
        token,
        fingerprint,
        expires_at - now,
        response,
        max(0.0, lease_until - now),
        holders[holder],
        created,
        expired_now,
    )
