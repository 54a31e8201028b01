"""Pure request fingerprint: what must match for a retry to be "the same request"."""

from __future__ import annotations

import asyncio
import hashlib

from proxy.idempotency import jcs, jcs_stream


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


def fingerprint(
    method: str,
    path: str,
    raw_query: str,
    content_type: str | None,
    body: bytes,
    max_json_depth: int,
) -> str:
    """hash(method, path, canonical query, media type, canonical body).

    JSON bodies are hashed in their RFC 8785 form (jcs.py); other bodies, and JSON that is not
    I-JSON (duplicate names, numbers a double cannot hold), as received. The two cannot collide:
    a canonical JSON text canonicalises to itself, so bytes hashed as received never are one.
    Raises jcs.JsonTooDeep.
    """
    media = media_type(content_type)
    digest = hashlib.sha256()
    for part in (method, path, canonical_query(raw_query), media):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    canonical = jcs.fast(body, max_json_depth) if body and is_json(media) else body
    if canonical is not None:
        digest.update(canonical)
        return digest.hexdigest()[:40]
    head = digest.copy()
    try:
        jcs_stream.canonicalise(body, digest.update, max_json_depth)
    except jcs.NotCanonical:
        digest = head
        digest.update(body)
    return digest.hexdigest()[:40]


async def fingerprint_off_loop(
    method: str,
    path: str,
    raw_query: str,
    content_type: str | None,
    body: bytes,
    max_json_depth: int,
) -> str:
    """fingerprint(), in a worker thread for a body the orjson path may not take: the tokenizer
    can hold the GIL for seconds on 10 MiB, and a thread lets the event loop keep serving
    meanwhile (the GIL changes hands every few ms). Small bodies stay on the loop."""
    args = (method, path, raw_query, content_type, body, max_json_depth)
    if len(body) <= jcs.FAST_MAX:
        return fingerprint(*args)
    return await asyncio.to_thread(fingerprint, *args)
