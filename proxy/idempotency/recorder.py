"""The response copy kept for replay, and the pure decision of what to do with a record."""

from __future__ import annotations

from proxy.http.headers import replay_headers
from proxy.stores.base import StoredResponse

# "Try again" answers: storing them would make a transient refusal permanent.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})

COMPLETE = "complete"
RELEASE = "release"
INDETERMINATE = "indeterminate"


class ResponseRecorder:
    """A BodyTap: keeps the status, the replayable headers and up to `limit` body bytes."""

    __slots__ = ("_chunks", "_extra", "_limit", "headers", "oversize", "size", "status")

    def __init__(self, limit: int, extra: frozenset[str]) -> None:
        self._limit = limit
        self._extra = extra
        self._chunks: list[bytes] = []
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.size = 0
        self.oversize = False

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = tuple(replay_headers(headers, self._extra))

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.oversize:
            return
        if self.size > self._limit:
            self.oversize = True
            self._chunks.clear()
        else:
            self._chunks.append(chunk)

    def stored(self) -> StoredResponse:
        if self.oversize:
            return StoredResponse(self.status, (), b"", replayable=False)
        return StoredResponse(self.status, self.headers, b"".join(self._chunks), replayable=True)


def decide(upstream_outcome: str | None, status: int, store_5xx: bool) -> str:
    """complete | release | indeterminate, from what the proxy knows about the exchange.

    Not sent: the upstream never saw it, the retry may run. Ambiguous (or unknown, e.g. the
    handler failed mid-way): the side effect may have happened, so retries are refused until the
    lease ends. Answered: store it, except "try again" answers and (by default) 5xx.
    """
    if upstream_outcome == "not_sent":
        return RELEASE
    if upstream_outcome != "answered":
        return INDETERMINATE
    if status in RETRYABLE_4XX or (status >= 500 and not store_5xx):
        return RELEASE
    return COMPLETE
