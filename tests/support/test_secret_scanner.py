"""The log scanner itself must catch what it claims to, or every clean scan means nothing."""

from __future__ import annotations

import pytest

from tests.support.secrets import AUTHORIZATION, COOKIE, IDEMPOTENCY_KEY, QUERY, find_secrets


@pytest.mark.parametrize(
    "line",
    [
        f'{{"event":"x","detail":"{AUTHORIZATION}"}}',
        f"cookie header was {COOKIE}",
        f'{{"idempotency.key_hash":"{IDEMPOTENCY_KEY}"}}',
        f'{{"detail":"/a?{QUERY}"}}',
        '{"headers":{"Authorization":"x"}}',
        "Authorization: Basic dXNlcjpwYXNz",
        'WARNING request failed: authorization=abc',
        '{"url.path":"/v1/pay?card=4111"}',
        "token Bearer eyJhbGciOiJIUzI1NiJ9",
    ],
)
def test_finds_secrets(line: str) -> None:
    assert find_secrets("ok line\n" + line + "\nanother") == [line]


def test_passes_clean_log_lines() -> None:
    clean = (
        '{"timestamp":"2026-11-28T12:00:00Z","trace_id":"0af7651916cd43dd8448eb211c80319c",'
        '"http.request.method":"POST","url.path":"/v1/payments","http.response.status_code":201,'
        '"idempotency.outcome":"miss","idempotency.key_hash":"9f2c","user.hash":"a1b2",'
        '"error.type":null}\n'
        '{"event":"start","level":"info","listen":"0.0.0.0:8000"}'
    )
    assert find_secrets(clean) == []
