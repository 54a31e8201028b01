"""No spelling of a protected path reaches the upstream without the route's protections: a real
`idemproxy run`, raw request lines, and an upstream that records the path it received."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import orjson

from tests.support.proxy_process import base_config
from tests.support.raw_client import RawResponse, exchange
from tests.support.upstream import RecordingUpstream

# Spellings of `{p}` (a protected path such as /v1/payments) that some server reads as `{p}`.
SPELLINGS = [
    "{p}",
    "{p}/",
    "{p}/sub",
    "{p}?q=1",
    "{a}/%{h}{rest}",  # one letter percent-encoded, upper- and lower-case hex
    "{a}/%{hl}{rest}",
    "{a}//{b}",
    "/{a}//{b}",
    "{a}/./{b}",
    "/x/..{p}",
    "/x/%2e%2e{p}",
    "/x/.%2E{p}",
    "/../..{p}",
    "{p}/.",
    "{p}/x/..",
    "{p};x",
    "{a};v=1/{b}",
    "{p}%3Bx",
    "{a}%2F{b}",
    "{a}%2f{b}",
    "{a}\\{b}",
    "{a}%5C{b}",
    "{a}/%25{h}{rest}",  # double-encoded
    "{a}/{b}%00",
    "{a}//../{b}",
    "{P}",  # case variants
    "{a}/{B}",
]


def spellings(protected: str) -> list[str]:
    a, _, b = protected.rpartition("/")
    first = ord(b[0])
    values = {"p": protected, "a": a, "b": b, "P": protected.upper(), "B": b.upper(),
              "h": f"{first:02X}", "hl": f"{first:02x}", "rest": b[1:]}
    return [spelling.format(**values) for spelling in SPELLINGS]


def lenient(raw: str, fold: bool) -> str:
    """How a lenient upstream framework reads a path: path parameters dropped, backslashes as
    slashes, decoded (twice), dots resolved, slashes merged, lower-cased if it ignores case."""
    path = raw.split("?")[0]
    path = "/".join(segment.split(";")[0] for segment in path.split("/"))
    path = unquote(unquote(path)).replace("\\", "/").split(";")[0]
    kept: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if kept:
                kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    path = "/" + "/".join(kept)
    return path.lower() if fold else path


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def config(upstream_url: str) -> dict[str, Any]:
    return base_config(
        upstream_url,
        routes=[
            {
                "name": "payments",
                "match": {"path_prefix": "/v1/payments", "methods": ["POST"]},
                "upstream": "app",
                "idempotency": {"enabled": True, "required": True},
            },
            {
                # An upstream that ignores case (Spring with case-insensitive matching, IIS):
                # the route opts in, so /V2/REFUNDS cannot walk past the key requirement.
                "name": "refunds",
                "match": {"path_prefix": "/v2/refunds", "ignore_case": True},
                "upstream": "app",
                "idempotency": {"enabled": True, "required": True},
            },
            {
                "name": "limited",
                "match": {"path_prefix": "/v1/limited"},
                "upstream": "app",
                "quota": {"rate": "1/h", "burst": 1},
            },
            {"name": "default", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    )


async def send(port: int, method: str, target: str) -> RawResponse:
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 2\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n{}"
    ).encode("latin-1")

    def blocking() -> RawResponse:
        response, connection = exchange(port, request)
        connection.close()
        assert response is not None, target
        return response

    return await asyncio.to_thread(blocking)


def slug(response: RawResponse) -> str:
    document = orjson.loads(response.body)
    return str(document["type"]).rsplit(":", 1)[-1]


async def test_no_spelling_reaches_the_upstream_without_a_key(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proxy = proxy_process(config(upstream.url))
    refusals: dict[str, str] = {}
    for protected, case_sensitive in (("/v1/payments", True), ("/v2/refunds", False)):
        a, _, b = protected.rpartition("/")
        case_variants = {protected.upper(), f"{a}/{b.upper()}"}
        for target in spellings(protected):
            response = await send(proxy.port, "POST", target)
            if response.status == 400:
                refusals[target] = slug(response)
            elif case_sensitive and target in case_variants:
                # Case is kept: a case-sensitive upstream serves /V1/PAYMENTS as another one.
                assert response.status == 200, (target, response.status)
            else:
                raise AssertionError(f"{target} answered {response.status} without a key")
    for received in upstream.received:
        assert not under(lenient(received.raw_path, fold=False), "/v1/payments"), received
        assert not under(lenient(received.raw_path, fold=True), "/v2/refunds"), received
    assert refusals["/v1/%70ayments"] == "key-missing"
    assert refusals["/v1//payments"] == "key-missing"
    assert refusals["/x/../v1/payments"] == "key-missing"
    assert refusals["/V2/REFUNDS"] == "key-missing"
    for target in ("/v1/payments;x", "/v1%2Fpayments", "/v1\\payments", "/v1/%2570ayments"):
        assert refusals[target] == "bad-path", target


async def test_no_spelling_walks_past_a_quota(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proxy = proxy_process(config(upstream.url))
    first = await send(proxy.port, "GET", "/v1/limited")
    assert first.status == 200
    statuses = {}
    for target in spellings("/v1/limited"):
        response = await send(proxy.port, "GET", target)
        statuses[target] = response.status
        if target not in ("/V1/LIMITED", "/v1/LIMITED"):  # case kept: another resource
            assert response.status in (400, 429), (target, response.status)
    reached = [
        r.raw_path for r in upstream.received if under(lenient(r.raw_path, False), "/v1/limited")
    ]
    assert reached == ["/v1/limited"]
    assert statuses["/v1/%6Cimited"] == 429


async def test_the_upstream_receives_the_normal_form_with_the_query_untouched(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proxy = proxy_process(config(upstream.url))
    response = await send(proxy.port, "GET", "/a/./b//%63/../%7e%c3%a9?x=%2F..%2f&y=a//b")
    assert response.status == 200
    assert [r.raw_path for r in upstream.received] == ["/a/b/~%C3%A9?x=%2F..%2f&y=a//b"]
