"""A parsed request for stage-level tests, as the data server would hand it to the pipeline."""

from __future__ import annotations

from proxy.http.request import HTTP_11, Request


def make_request(method: str, path: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Request:
    return Request(method, path, "", HTTP_11, ((b"Host", b"test"), *headers), "127.0.0.1",
                   None, None)
