"""A parsed request for stage-level tests, as the data server would hand it to the pipeline."""

from __future__ import annotations

from proxy.http.request import HTTP_11, Body, Request


def make_request(
    method: str, path: str, headers: tuple[tuple[bytes, bytes], ...] = (), body: bytes = b""
) -> Request:
    """`body`, when given, has fully arrived (with its Content-Length)."""
    content = None
    if body:
        content = Body(len(body))
        content.feed(body)
        content.feed_eof()
        headers = (*headers, (b"Content-Length", str(len(body)).encode()))
    return Request(method, path, "", HTTP_11, ((b"Host", b"test"), *headers), "127.0.0.1",
                   None, content)
