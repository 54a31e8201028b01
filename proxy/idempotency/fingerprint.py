"""Pure request fingerprint: what must match for a retry to be "the same request"."""

from __future__ import annotations

import hashlib

import orjson


def media_type(content_type: str | None) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json`."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def canonical_query(raw_query: str) -> str:
    """Parameters ordered by name; repeated names keep their relative order."""
    if not raw_query:
        return ""
    params = [p for p in raw_query.split("&") if p]
    params.sort(key=lambda p: p.split("=", 1)[0])
    return "&".join(params)


def canonical_body(media: str, body: bytes) -> bytes:
    """JSON bodies re-serialised with sorted keys and no whitespace; others as received."""
    if body and is_json(media):
        try:
            return orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
        except orjson.JSONDecodeError:
            return body
    return body


def fingerprint(
    method: str, path: str, raw_query: str, content_type: str | None, body: bytes
) -> str:
    """hash(method, path, canonical query, media type, canonical body)."""
    media = media_type(content_type)
    digest = hashlib.sha256()
    for part in (method, path, canonical_query(raw_query), media):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    digest.update(canonical_body(media, body))
    return digest.hexdigest()[:40]
