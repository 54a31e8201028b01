"""The Redis record layout and the Lua scripts that move a record between states.

Schema 3 (this release writes it): one Redis **string** per record, a small binary head and the
body at the end, so a completed record costs its bytes plus Redis' per-key overhead (about
150 B). Schemas 1 and 2 stored a hash; a body over 64 bytes pushed the hash out of Redis'
compact listpack encoding into a table of separately allocated fields (about 2.1 KB for a
1 KiB body). The head, big-endian (Lua's `struct` and Python's `struct` read it alike):

    B version (3) | c1 state (f in flight, c completed, i indeterminate) | B replayable |
    H status | d lease deadline, ms of the server's clock | d created, ms |
    H+token | H+fingerprint | H+holder | I4+headers JSON | body (the rest)

The state is byte 1, so a claim that finds a dead holder turns the record indeterminate with
`SETRANGE` without rewriting the rest. Hash records written by the previous releases are still
read (replayed, turned indeterminate, released by an operator): every script looks at the
key's type first. A record reaches Python as `[record, pttl, now, flag]` where `record` is the
string, or for a hash the flat HGETALL list.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import orjson

from proxy.redis.scripts import Script
from proxy.stores.base import COMPLETED, Record, RecordState, StoredResponse, StoreError

SCHEMA_VERSION = 3
# Hash records of the previous releases: 1 (no lease deadline: they end by PEXPIRE), 2.
HASH_VERSIONS = frozenset({b"1", b"2"})

_HEAD = struct.Struct(">BcBHddH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_STATES = {b"f": RecordState.IN_FLIGHT, b"c": RecordState.COMPLETED,
           b"i": RecordState.INDETERMINATE}
STATE_CODES = {state: code.decode() for code, state in _STATES.items()}
COMPLETED_CODE = STATE_CODES[COMPLETED]  # read per request: a global (stores/base.py)

# Shared by the scripts: the server's clock in ms (never the proxy's: replicas' clocks differ;
# one server decides), and the record's kind, state, token and lease deadline whatever its
# schema (`lease_until` is nil for a version 1 hash: it has none).
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local HEAD = '>Bc1BHddHc0Hc0Hc0'
local kind = redis.call('TYPE', KEYS[1]).ok
local value, state, token, lease_until
if kind == 'string' then
  value = redis.call('GET', KEYS[1])
  if string.byte(value, 1) == 3 then
    local _v, _r, _s, _c
    _v, state, _r, _s, lease_until, _c, token = struct.unpack(HEAD, value)
  end
elseif kind == 'hash' then
  local short = {in_flight = 'f', completed = 'c', indeterminate = 'i'}
  state = short[redis.call('HGET', KEYS[1], 'state')]
  token = redis.call('HGET', KEYS[1], 'token')
  lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until'))
elseif kind ~= 'none' then
  return redis.error_reply('WRONGTYPE idempotency record is a ' .. kind)
end
local function reply(flag)
  local record = value
  if kind == 'hash' then record = redis.call('HGETALL', KEYS[1]) end
  return {record, redis.call('PTTL', KEYS[1]), string.format('%d', now), flag}
end
local function set_state(code)
  if kind == 'hash' then
    local long = {f = 'in_flight', c = 'completed', i = 'indeterminate'}
    redis.call('HSET', KEYS[1], 'state', long[code])
  else
    redis.call('SETRANGE', KEYS[1], 1, code)
    value = redis.call('GET', KEYS[1])
  end
end
"""

# ARGV token, fingerprint, lease ms, expiry ms, hold (1|0), holder. Returns 0 when the caller
# owns the record (new, taken over, or its own earlier claim), else the record (flag 1 when
# this claim found the holder's lease run out and made the record indeterminate). A record of
# an unknown schema is returned untouched (no token or state read from it).
CLAIM = Script(_READ + """
local expired = false
if token and token ~= ARGV[1] and lease_until and lease_until <= now and state ~= 'c' then
  if ARGV[5] == '0' then
    token = nil
  elseif state == 'f' then
    set_state('i')
    expired = true
  end
end
if kind == 'none' or (token == nil and state ~= nil) then
  redis.call('SET', KEYS[1], struct.pack(HEAD .. 'I4', 3, 'f', 0, 0, now + tonumber(ARGV[3]),
             now, #ARGV[1], ARGV[1], #ARGV[2], ARGV[2], #ARGV[6], ARGV[6], 0), 'PX', ARGV[4])
  return 0
end
if token == ARGV[1] then return 0 end
return reply(expired and '1' or '0')
""")

GET = Script(_READ + """
if kind == 'none' then return 0 end
return reply('0')
""")

# Owner only, and only schema 3: this release's tokens are in no hash record.
# ARGV token, new state code (c|i), ttl ms, status, headers json, body, replayable (1|0).
# c (from in flight, or from indeterminate when a slow but live owner finishes after its lease
# ran out): store the response and restart the expiry at the retention ttl; i (from in
# flight): keep the expiry. Repeating a finished transition answers 1.
COMPLETE = Script(_READ + """
if kind ~= 'string' or token ~= ARGV[1] then return 0 end
if state == ARGV[2] then return 1 end
if ARGV[2] == 'i' then
  if state ~= 'f' then return 0 end
  set_state('i')
  return 1
end
if state == 'c' then return 0 end
local _v, _s, _r, _st, _l, created, _t, fp, holder = struct.unpack(HEAD, value)
redis.call('SET', KEYS[1], struct.pack(HEAD .. 'I4', 3, 'c', tonumber(ARGV[7]),
           tonumber(ARGV[4]), lease_until, created, #token, token, #fp, fp, #holder, holder,
           #ARGV[5]) .. ARGV[5] .. ARGV[6], 'PX', ARGV[3])
return 1
""")

RELEASE = Script(_READ + """
if kind ~= 'string' or token ~= ARGV[1] or state ~= 'f' then return 0 end
return redis.call('DEL', KEYS[1])
""")

# An operator's release: delete unless in flight under a live lease (version 1 in-flight
# records have no deadline and count as live; they end by PEXPIRE). Returns the record as it
# was, flag 1 when it was deleted, or 0 when there is none.
DISCARD = Script(_READ + """
if kind == 'none' then return 0 end
local record = reply('0')
if state == 'f' and (not lease_until or lease_until > now) then return record end
redis.call('DEL', KEYS[1])
record[4] = '1'
return record
""")


def flagged(reply: Sequence[Any]) -> bool:
    """The script's flag: expired now (claim), deleted (discard)."""
    return bool(reply[3] == b"1")


def parse_record(reply: Sequence[Any], expired_now: bool = False) -> Record:
    """A record from the `[record, pttl, now, flag]` the scripts return."""
    record, pttl, now = reply[0], int(reply[1]), int(reply[2])
    if isinstance(record, list):
        return _from_hash(record, pttl, now, expired_now)
    assert isinstance(record, bytes)
    if record[:1] != b"\x03":
        raise StoreError(f"record schema {record[:1]!r} is not supported by this version")
    _, code, replayable, status, lease_until, created, size = _HEAD.unpack_from(record)
    at = _HEAD.size
    token = record[at:at + size].decode()
    at += size
    (size,) = _U16.unpack_from(record, at)
    fingerprint = record[at + 2:at + 2 + size].decode()
    at += 2 + size
    (size,) = _U16.unpack_from(record, at)
    holder = record[at + 2:at + 2 + size].decode()
    at += 2 + size
    state = _STATES[code]
    response = None
    if state == COMPLETED:
        (size,) = _U32.unpack_from(record, at)
        at += 4
        headers = tuple((k, v) for k, v in orjson.loads(record[at:at + size]))
        response = StoredResponse(status, headers, record[at + size:], replayable == 1)
    return Record(state, token, fingerprint, pttl / 1000 if pttl > 0 else 0.0, response,
                  max(0.0, lease_until - now) / 1000, holder, created / 1000, expired_now)


def _from_hash(reply: Sequence[bytes], pttl: int, now: int, expired_now: bool) -> Record:
    """A schema 1 or 2 record (a hash) written by a previous release."""
    fields = {reply[i]: reply[i + 1] for i in range(0, len(reply) - 1, 2)}
    version = fields.get(b"v", b"")
    if version not in HASH_VERSIONS:
        raise StoreError(f"record schema {version!r} is not supported by this version")
    state = RecordState(fields[b"state"].decode())
    response = None
    if state == COMPLETED:
        headers = tuple((k, v) for k, v in orjson.loads(fields[b"headers"]))
        response = StoredResponse(
            int(fields[b"status"]), headers, fields[b"body"], fields[b"replayable"] == b"1"
        )
    lease_until = int(fields.get(b"lease_until", b"0"))
    remaining = pttl / 1000 if pttl > 0 else 0.0
    return Record(
        state,
        fields[b"token"].decode(),
        fields[b"fp"].decode(),
        remaining,
        response,
        max(0, lease_until - now) / 1000 if lease_until else remaining,
        fields.get(b"holder", b"").decode(),
        # `created` is the server's clock; shown as is (server and proxy clocks agree closely).
        int(fields.get(b"created", b"0")) / 1000,
        expired_now,
    )
