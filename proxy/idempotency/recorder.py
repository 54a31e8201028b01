"""The response copy kept for replay, and the pure decision of what to do with a record."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.http.context import Decision, UpstreamOutcome
from proxy.http.headers import replay_headers
from proxy.stores.base import StoredResponse

# Read per request, as globals: on Python 3.11 an enum class attribute is read through
# EnumType.__getattr__'s slot, a call (docs/performance.md, "Enum members and config fields").
_NOT_SENT, _ANSWERED = UpstreamOutcome.NOT_SENT, UpstreamOutcome.ANSWERED
_RELEASE, _INDETERMINATE, _COMPLETE = Decision.RELEASE, Decision.INDETERMINATE, Decision.COMPLETE

# "Try again" answers: storing them would make a transient refusal permanent.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


async def _nothing() -> None:
    return None


class ResponseRecorder:
    """A BodyTap: keeps the status, the replayable headers and up to `limit` body bytes, and
    runs `on_commit` once, before the last byte of the response goes to the client."""

    __slots__ = (
        "_chunks", "_extra", "_limit", "headers", "on_commit", "oversize", "size", "status"
    )

    def __init__(self, limit: int, extra: frozenset[str]) -> None:
        self._limit = limit
        self._extra = extra
        self._chunks: list[bytes] = []
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.size = 0
        self.oversize = False
        self.on_commit: Callable[[], Awaitable[None]] = _nothing

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

    async def commit(self) -> None:
        commit, self.on_commit = self.on_commit, _nothing
        await commit()

    def stored(self) -> StoredResponse:
        if self.oversize:
            return StoredResponse(self.status, (), b"", replayable=False)
        return StoredResponse(self.status, self.headers, b"".join(self._chunks), replayable=True)


def decide(upstream_outcome: UpstreamOutcome | None, status: int, store_5xx: bool) -> Decision:
    """From what the proxy knows about the exchange.

    Not sent: the upstream never saw it, the retry may run. Ambiguous (or unknown, e.g. the
    handler failed mid-way): the side effect may have happened, so the key is held
    indeterminate. Answered: store it, except "try again" answers and (by default) 5xx.
    """
    if upstream_outcome == _NOT_SENT:
        return _RELEASE
    if upstream_outcome != _ANSWERED:
        return _INDETERMINATE
    if status in RETRYABLE_4XX or (status >= 500 and not store_5xx):
        return _RELEASE
    return _COMPLETE
