import pytest

from proxy.http.context import Decision
from proxy.idempotency.recorder import ResponseRecorder, decide

COMPLETE, RELEASE, INDETERMINATE = Decision


@pytest.mark.parametrize(
    ("outcome", "status", "store_5xx", "decision"),
    [
        ("not_sent", 0, False, RELEASE),
        ("ambiguous", 0, False, INDETERMINATE),
        ("ambiguous", 200, False, INDETERMINATE),  # body broke after the headers
        (None, 0, False, INDETERMINATE),
        ("answered", 200, False, COMPLETE),
        ("answered", 201, False, COMPLETE),
        ("answered", 303, False, COMPLETE),
        ("answered", 400, False, COMPLETE),
        ("answered", 404, False, COMPLETE),
        ("answered", 408, False, RELEASE),
        ("answered", 409, False, RELEASE),
        ("answered", 425, False, RELEASE),
        ("answered", 429, False, RELEASE),
        ("answered", 500, False, RELEASE),
        ("answered", 503, False, RELEASE),
        ("answered", 500, True, COMPLETE),
        ("answered", 429, True, RELEASE),
    ],
)
def test_decide(outcome: str | None, status: int, store_5xx: bool, decision: str) -> None:
    assert decide(outcome, status, store_5xx) == decision


def test_recorder_keeps_the_allow_listed_headers_and_the_body() -> None:
    recorder = ResponseRecorder(10, frozenset({"x-extra"}))
    recorder.start(201, [("Content-Type", "text/plain"), ("Set-Cookie", "s=1"),
                         ("X-Extra", "1"), ("Date", "now"), ("Via", "1.1 idemproxy")])
    recorder.feed(b"12345")
    recorder.feed(b"67890")
    stored = recorder.stored()
    assert stored.replayable
    assert (stored.status, stored.body) == (201, b"1234567890")
    assert stored.headers == (("Content-Type", "text/plain"), ("X-Extra", "1"))


def test_recorder_over_the_limit_keeps_nothing_replayable() -> None:
    recorder = ResponseRecorder(10, frozenset())
    recorder.start(200, [])
    recorder.feed(b"123456")
    recorder.feed(b"78901")
    recorder.feed(b"2")
    stored = recorder.stored()
    assert not stored.replayable
    assert (stored.status, stored.body, recorder.size) == (200, b"", 12)
