"""The path normaliser: examples per input class, then properties against lenient upstreams."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.http.path import UNRESERVED, BadPath, canonical, is_normal, normalise
from proxy.pipeline.routing import RouteTable, Spec

PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/v1/payments", "/v1/payments"),
        ("/.well-known/x", "/.well-known/x"),
        ("/v1/%70ayments", "/v1/payments"),  # encoded unreserved: decoded
        ("/v1/%7e%2D%5F", "/v1/~-_"),
        ("/v1//payments", "/v1/payments"),  # empty segments merged
        ("//v1///payments//", "/v1/payments/"),
        ("/x/../v1/payments", "/v1/payments"),  # dot segments resolved
        ("/v1/./payments/.", "/v1/payments/"),
        ("/../../v1", "/v1"),  # `..` above the root stays at the root
        ("/v1/%2e%2E/v2", "/v2"),  # an encoded dot is a dot
        ("/a/b//c/../d", "/a/b/d"),  # `..` after a named segment: no ambiguity
        ("/%c3%a9t%c3%a9", "/%C3%A9t%C3%A9"),  # other encodings kept, upper-case hex
        ("/a%20b%3a%40", "/a%20b%3A%40"),
        ("/V1/Payments", "/V1/Payments"),  # case is kept
        ("/a|b", "/a|b"),
    ],
)
def test_normal_forms(raw: str, normal: str) -> None:
    assert normalise(raw) == normal


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/v1/payments;x", "';'"),
        ("/v1;a=b/payments", "';'"),
        ("/v1/payments%3bx", "%3B"),
        ("/v1%2Fpayments", "%2F"),
        ("/v1%2fpayments", "%2F"),
        ("/v1\\payments", "'\\'"),
        ("/v1%5Cpayments", "%5C"),
        ("/v1/%2570ayments", "%25"),
        ("/v1/pay%00ments", "control"),
        ("/v1/pay%0aments", "control"),
        ("/v1/pay%7Fments", "control"),
        ("/v1/pay\x00ments", "control"),
        ("/v1/pay\tments", "control"),
        ("/v1/p\u00e4y", "non-ASCII"),
        ("/v1/%7", "malformed"),
        ("/v1/%zz", "malformed"),
        ("/v1/%", "malformed"),
        ("/a//../b", "ambiguous"),
        ("//../v1", "ambiguous"),
        ("v1/payments", "start with '/'"),
    ],
)
def test_refused_spellings(raw: str, reason: str) -> None:
    with pytest.raises(BadPath, match=re.escape(reason)):
        normalise(raw)


# --- properties -----------------------------------------------------------------------------

# Characters that make spellings interesting; the tests draw paths from these.
_ALPHABET = "ab/.%;\\~-_P2eEfF5cC0Aa7"
_RAW_PATHS = st.text(alphabet=_ALPHABET, max_size=24).map(lambda s: "/" + s)


@PROPERTY
@given(_RAW_PATHS)
def test_idempotent(path: str) -> None:
    try:
        once = normalise(path)
    except BadPath:
        return
    assert normalise(once) == once
    assert canonical(once) == once


@PROPERTY
@given(_RAW_PATHS)
def test_the_fast_path_agrees_with_the_full_rules(path: str) -> None:
    if is_normal(path):
        assert canonical(path) == path


_SEGMENT = st.text(alphabet="abcxyzPAY019-._~", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
_PREFIXES = st.lists(_SEGMENT, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s))


def _spell(draw: st.DrawFn, text: str) -> str:
    """Another spelling of `text` (a normal path) that some server reads as the same path."""
    out: list[str] = []
    for char in text:
        choice = draw(st.integers(0, 9))
        if char == "/" and choice == 0:
            out.append("//")
        elif char == "/" and choice == 1:
            out.append("/./")
        elif char == "/" and choice == 2:
            out.append("/" + draw(_SEGMENT) + "/../")
        elif char == "/" and choice == 3:
            out.append(draw(st.sampled_from(["%2F", "%2f", "\\", "%5C", "/%2e/", "/.%2E/../"])))
        elif char == "/" and choice == 4:
            out.append(";" + draw(_SEGMENT) + "/")
        elif char != "/" and choice in (0, 1):
            hex_ = f"{ord(char):02X}"
            out.append("%" + draw(st.sampled_from([hex_, hex_.lower()])))
        elif char != "/" and choice == 2:
            out.append("%25" + f"{ord(char):02X}")  # double-encoded
        else:
            out.append(char)
    return "".join(out)


def _decode_all(path: str) -> str:
    return unquote(path, errors="surrogateescape")


def _resolve(path: str, merge_first: bool) -> str:
    segments = path.split("/")[1:]
    if merge_first:
        segments = [s for s in segments[:-1] if s] + segments[-1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    return "/" + "/".join(s for s in kept if s)


def _lenient_views(raw: str) -> list[str]:
    """How lenient servers read a raw path: decode everything once, then resolve dots and merge
    slashes in either order (nginx, Envoy); also path parameters dropped (Tomcat, Jetty),
    backslashes as slashes (IIS) and a second decode."""
    no_params = "/".join(segment.split(";")[0] for segment in raw.split("/"))
    backslashed = raw.replace("\\", "/").replace("%5C", "/").replace("%5c", "/")
    views = []
    for source in (raw, no_params, backslashed, _decode_all(raw)):
        decoded = _decode_all(source)
        views.append(_resolve(decoded, merge_first=True))
        views.append(_resolve(decoded, merge_first=False))
    return views


@st.composite
def _tables(draw: st.DrawFn) -> tuple[list[str], str, str]:
    """Protected prefixes in config order (a catch-all last), one protected prefix and a raw
    spelling of a path under it."""
    prefixes = draw(st.lists(_PREFIXES, min_size=1, max_size=4, unique=True))
    protected = draw(st.sampled_from(prefixes))
    tail = draw(st.sampled_from(["", "/", "/x", "/x/y"]))
    raw = _spell(draw, protected + tail)
    return prefixes, protected, raw


@PROPERTY
@given(_tables())
def test_no_spelling_of_a_protected_path_escapes_its_route(
    case: tuple[list[str], str, str],
) -> None:
    """If any lenient server reads `raw` as a path under `protected`, the proxy either refuses
    `raw` or routes it to the route `protected` itself gets."""
    prefixes, protected, raw = case
    views = _lenient_views(raw)
    assume(any(v == protected or v.startswith(protected + "/") for v in views))
    table = RouteTable([*(Spec(p, None, p) for p in prefixes), Spec("/", None, "catch-all")])
    try:
        normal = normalise(raw)
    except BadPath:
        return
    expected = table.match(protected, "POST")
    assert table.match(normal, "POST") == expected
    # And the upstream, given the normal form, reads the same path the proxy routed on.
    assert all(view == _resolve(_decode_all(normal), True) for view in _lenient_views(normal))


@PROPERTY
@given(_tables(), st.sampled_from(["lower", "upper", "swapcase", "title"]))
def test_case_variants_reach_an_ignore_case_route(
    case: tuple[list[str], str, str], fold: str
) -> None:
    prefixes, protected, raw = case
    raw = getattr(raw, fold)()
    table = RouteTable(
        [*(Spec(p, None, p, ignore_case=True) for p in prefixes), Spec("/", None, "catch-all")]
    )
    views = [v.lower() for v in _lenient_views(raw)]
    assume(any(v == protected.lower() or v.startswith(protected.lower() + "/") for v in views))
    try:
        normal = normalise(raw)
    except BadPath:
        return
    assert table.match(normal, "GET") == table.match(protected, "GET")


def test_unreserved_is_rfc_3986() -> None:
    assert "".join(sorted(UNRESERVED)) == (
        "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
    )
