"""The request path in one canonical spelling, so the route, the quota and the upstream agree.

`normalise` is pure and runs on every request before routing; the proxy matches routes on its
result and forwards that same path. Rules (docs/security/paths.md has the table and the why):

- percent-encoded unreserved characters (A-Z a-z 0-9 - . _ ~, RFC 3986 §2.3) are decoded, every
  other percent-encoding keeps its byte with upper-case hex (§6.2.2.1);
- dot segments are resolved (§5.2.4; `..` above the root stays at the root) and empty segments
  merged (`//` -> `/`), the way nginx and Envoy's `normalize_path` + `merge_slashes` do;
- spellings that servers read differently are refused, never guessed: `;` and `%3B` (path
  parameters: Tomcat and Jetty drop them), `\\` and `%5C` (a separator on some servers), `%2F`
  (a separator once decoded), `%25` (a second decode), control characters raw or encoded,
  non-ASCII, a malformed `%`, and `..` right after `//` (nginx and Envoy resolve it differently).

Letter case is left alone: routes may opt in to case-insensitive matching instead.
"""

from __future__ import annotations

import string

# RFC 3986 §2.3.
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Encoded bytes that change the path's structure for some server once decoded.
_REFUSED_ENCODED = {
    0x2F: "an encoded '/' (%2F)",
    0x5C: "an encoded '\\' (%5C)",
    0x25: "an encoded '%' (%25), which a second decode would reinterpret",
    0x3B: "an encoded ';' (%3B)",
}


def _escape_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Per two-digit hex code in either case: what to emit for it, or why it is refused."""
    emit: dict[str, str] = {}
    refuse: dict[str, str] = {}
    for high in string.hexdigits:
        for low in string.hexdigits:
            code = high + low
            octet = int(code, 16)
            if chr(octet) in UNRESERVED:
                emit[code] = chr(octet)
            elif octet in _REFUSED_ENCODED:
                refuse[code] = _REFUSED_ENCODED[octet]
            elif octet < 0x20 or octet == 0x7F:
                refuse[code] = f"an encoded control character (%{octet:02X})"
            else:
                emit[code] = f"%{octet:02X}"
    return emit, refuse


_DECODED, _REFUSED = _escape_tables()


class BadPath(ValueError):
    """The path has a spelling the proxy refuses (answered 400 `bad-path`); str() says why."""


def is_normal(path: str) -> bool:
    """True for a path `normalise` returns unchanged without looking closer (almost every
    request): no percent sign, no dot segment, no empty segment, nothing refused."""
    return (
        path.startswith("/")
        and path.isascii()
        and path.isprintable()
        and "%" not in path
        and "//" not in path
        and "/." not in path
        and ";" not in path
        and "\\" not in path
    )


def normalise(path: str) -> str:
    """The canonical spelling of an origin-form path (no query); raises BadPath."""
    if is_normal(path):
        return path
    return canonical(path)


def canonical(path: str) -> str:
    """`normalise` without the fast path (which must agree with it; the tests check that)."""
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    if not path.isascii():
        raise BadPath("the path contains a non-ASCII byte; percent-encode it")
    if not path.isprintable():
        raise BadPath("the path contains a control character")
    if ";" in path:
        raise BadPath("the path contains ';' (path parameters are read differently by servers)")
    if "\\" in path:
        raise BadPath("the path contains '\\' (a separator on some servers)")
    if "%" in path:
        path = _decode_unreserved(path)
    return _resolve(path)


def _decode_unreserved(path: str) -> str:
    head, *rest = path.split("%")
    out = [head]
    for piece in rest:
        code = piece[:2]
        char = _DECODED.get(code)
        if char is None:
            reason = _REFUSED.get(code)
            if reason is None:
                raise BadPath(f"malformed percent-encoding '%{code}'")
            raise BadPath(f"the path contains {reason}")
        out.append(char)
        out.append(piece[2:])
    return "".join(out)


def _resolve(path: str) -> str:
    """RFC 3986 §5.2.4 remove_dot_segments, then empty segments merged."""
    segments = path.split("/")
    last = len(segments) - 1
    kept: list[str] = []
    for i in range(1, last + 1):
        segment = segments[i]
        if segment == "..":
            if kept and kept[-1] == "":
                # nginx merges `//` first ("/a//../b" -> "/b"), Envoy resolves dots first
                # ("/a/b"): which resource is meant depends on the server, so refuse.
                raise BadPath("'..' after an empty segment ('//') is ambiguous")
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    trailing = segments[last] in ("", ".", "..")
    names = [segment for segment in kept if segment]
    if not names:
        return "/"
    return "/" + "/".join(names) + ("/" if trailing else "")
