"""Fuzz targets: bytes in, the documented outcome or an AssertionError out.

Shared by the atheris harness (`python -m tests.fuzz.run`), the corpus replay in the normal test
run, and the hypothesis properties. No atheris import here, so pytest needs only the stdlib.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import ip_address, ip_network

from proxy.config import ConfigError, loads
from proxy.http import headers, path
from proxy.http.request_checks import check_request
from proxy.idempotency import fingerprint, jcs, jcs_stream, keys
from proxy.observability import tracing

_HEX = re.compile(r"[0-9a-f]+")
TRUSTED = [ip_network("10.0.0.0/8"), ip_network("::1/128")]


def _is_id(value: str, length: int) -> bool:
    return len(value) == length and bool(_HEX.fullmatch(value)) and value != "0" * length


def check_trace_values(text: str) -> None:
    parsed = tracing.parse_traceparent(text)
    if parsed is not None:
        trace_id, parent_id, flags = parsed
        assert _is_id(trace_id, 32)
        assert _is_id(parent_id, 16)
        assert len(flags) == 2
        assert _HEX.fullmatch(flags)
    trace_id = tracing.parse_trace_id(text)
    if trace_id is not None:
        assert _is_id(trace_id, 32)


def traceparent(data: bytes) -> None:
    check_trace_values(data.decode("utf-8", "replace"))


def check_header_filters(peer: str, items: list[tuple[str, str]]) -> None:
    """The filter invariants for any header list and peer address."""
    listed = headers.connection_tokens(v for k, v in items if k.lower() == "connection")
    stripped = headers.strip_hop_by_hop(items)
    for name, _ in stripped:
        lowered = name.lower()
        assert lowered not in headers.HOP_BY_HOP
        assert lowered not in headers.FRAMING
        assert lowered not in listed
    assert [pair for pair in items if pair in stripped] == stripped  # order kept, nothing added

    upstream = headers.upstream_request_headers(
        items, peer=peer, host="h", trusted=TRUSTED, drop=headers.TRACE_CONTEXT
    )
    names = [k.lower() for k, _ in upstream]
    assert names.count("x-forwarded-for") == 1
    assert names.count("via") == 1
    assert "host" not in names
    assert not set(names) & (headers.HOP_BY_HOP | headers.FRAMING | headers.TRACE_CONTEXT)
    if not headers.is_trusted(peer, TRUSTED):
        assert dict(upstream)["X-Forwarded-For"] == peer
        assert "forwarded" not in names
        assert "x-real-ip" not in names

    downstream, problem = headers.relay_headers(items)
    assert not {k.lower() for k, _ in downstream} & (headers.HOP_BY_HOP | headers.FRAMING)
    if problem is None:
        assert all("\r" not in v and "\n" not in v and "\x00" not in v for _, v in items)
        assert downstream[-1] == ("Via", headers.VIA)
    else:
        assert downstream == []  # a refused head relays nothing

    if not headers.is_trusted(peer, TRUSTED):
        own = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
        assert not set(names) & (headers.UNTRUSTED_FORWARDING - own)

    forwarded = [v for k, v in items if k.lower() == "x-forwarded-for"]
    address = headers.client_address(peer, forwarded, TRUSTED)
    if address != peer:  # an IP address, in its one spelling, that some hop carried
        assert address == str(ip_address(address))
        assert any(_same_address(address, hop) for v in forwarded for hop in v.split(","))

    raw = [(k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in items]
    encodings = [v for k, v in items if k.lower() == "transfer-encoding"]
    rejection = check_request((1, 1), "/" + peer, raw, encodings, 16 * 1024)
    if rejection is None and encodings:
        assert [t.strip().lower() for v in encodings for t in v.split(",")] == ["chunked"]


def _same_address(address: str, hop: str) -> bool:
    try:
        return str(ip_address(hop.strip())) == address
    except ValueError:
        return False


def header_filter(data: bytes) -> None:
    """First line: the peer address; every further line `name:value`."""
    lines = data.decode("latin-1").split("\n")
    items = [(k, v) for k, _, v in (line.partition(":") for line in lines[1:])]
    check_header_filters(lines[0], items)


def request_path(data: bytes) -> None:
    """Any path: its normal form, or BadPath; the normal form is its own normal form and has
    nothing left for an upstream to reinterpret."""
    raw = data.decode("latin-1")
    try:
        normal = path.normalise(raw)
    except path.BadPath:
        return
    assert path.normalise(normal) == normal == path.canonical(normal)
    assert normal.startswith("/") and normal.isascii() and normal.isprintable()
    assert "//" not in normal and not {";", "\\"} & set(normal)
    segments = normal.split("/")
    assert "." not in segments and ".." not in segments


def quoted(key: str) -> str:
    """`key` as an RFC 8941 sf-string."""
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_key_value(value: str) -> None:
    """A header value: a key of 1-255 visible ASCII characters, or None; never anything else."""
    key = keys.parse_key(value)
    if key is None:
        return
    assert 1 <= len(key) <= keys.MAX_KEY_LENGTH
    assert all("!" <= char <= "~" for char in key)
    if not value.startswith('"'):
        assert key == value  # a bare token is the key itself
    assert keys.parse_key(quoted(key)) == key  # every accepted key has one canonical quoting
    storage = keys.storage_key("route", "identity", key)
    assert len(storage) == 40 and _HEX.fullmatch(storage)


def idempotency_key(data: bytes) -> None:
    check_key_value(data.decode("latin-1"))


def config(data: bytes) -> None:
    """Any text: a Config or a ConfigError whose every line names a path; nothing else."""
    try:
        loads(data.decode("utf-8", "replace"), "fuzz.yaml", env={})
    except ConfigError as exc:
        problems = exc.problems
    else:
        return
    assert problems
    assert all(isinstance(p, str) and p for p in problems)


def _canonical(data: bytes, max_depth: int) -> bytes | str:
    out = bytearray()
    try:
        jcs_stream.canonicalise(data, out.extend, max_depth)
    except jcs.NotCanonical:
        return "as received"
    except jcs.JsonTooDeep:
        return "too deep"
    return bytes(out)


def json_fingerprint(data: bytes) -> None:
    """Any body as JSON: a 40-hex fingerprint or JsonTooDeep, never another error; the orjson
    path agrees with the tokenizer, and a canonical text is its own canonical form."""
    max_depth = 8 if data[:1] == b" " else 128  # a leading space: try a low limit too
    try:
        fp = fingerprint.fingerprint("POST", "/", "", "application/json", data, max_depth)
    except jcs.JsonTooDeep:
        fp = None
    canonical = _canonical(data, max_depth)
    assert (fp is None) == (canonical == "too deep")
    if fp is not None:
        assert len(fp) == 40 and _HEX.fullmatch(fp)
    fast = jcs.fast(data, max_depth)
    if fast is not None:
        assert fast == canonical
    if isinstance(canonical, bytes):
        assert _canonical(canonical, max_depth) == canonical


TARGETS: dict[str, Callable[[bytes], None]] = {
    "traceparent": traceparent,
    "idempotency_key": idempotency_key,
    "header_filter": header_filter,
    "request_path": request_path,
    "config": config,
    "json_fingerprint": json_fingerprint,
}
