"""Retries are safe by default: GETs and idempotency-claimed requests resend on not-sent
failures; an unkeyed POST is never sent twice, whatever the route opts into."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.config import Retries
from proxy.config import Upstream as UpstreamConfig
from proxy.http.context import RequestContext
from proxy.upstream import retry
from proxy.upstream.targets import Upstream
from proxy.upstream.transport import UpstreamNotSent, UpstreamTimeout
from tests.support.faults import first_then, hang_until, refusing_url, status, unanswered_url
from tests.support.proxy_process import base_config
from tests.support.requests import make_request
from tests.support.upstream import RecordingUpstream, echo


def retry_config(urls: list[str], retries: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    config = base_config(urls[0])
    app = config["upstreams"]["app"]
    del app["url"]
    app["targets"] = [{"url": url} for url in urls]
    app.update(upstream)
    config["routes"][0]["retries"] = retries
    return config


async def test_get_is_resent_to_the_next_target_when_not_sent(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    client = await make_proxy(retry_config([refusing_url(), upstream.url], {"attempts": 2}))
    response = await client.get("/orders")
    assert response.status == 200
    assert upstream.count == 1


async def test_without_a_retry_policy_nothing_is_resent(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    config = retry_config([refusing_url(), upstream.url], {})
    del config["routes"][0]["retries"]
    client = await make_proxy(config)
    assert (await client.get("/orders")).status == 502
    assert upstream.count == 0


async def test_unkeyed_post_is_never_resent(make_proxy: Any, upstream: RecordingUpstream) -> None:
    everything = {"attempts": 5, "backoff": "1ms", "on": ["not_sent", "ambiguous", 503]}
    client = await make_proxy(retry_config([refusing_url(), upstream.url], everything))
    assert (await client.post("/pay", data=b"{}")).status == 502
    assert upstream.count == 0, "a POST without an idempotency claim is not resent"
    upstream.respond = status(503)
    client = await make_proxy(retry_config([upstream.url], everything))
    assert (await client.post("/pay", data=b"{}")).status == 503
    assert upstream.count == 1


async def test_get_retries_opted_in_statuses(make_proxy: Any, upstream: RecordingUpstream) -> None:
    upstream.respond = first_then(status(503), echo)
    client = await make_proxy(retry_config([upstream.url], {"attempts": 3, "on": [503]}))
    response = await client.get("/x")
    assert response.status == 200
    assert upstream.count == 2


async def test_get_status_not_opted_in_is_relayed(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    upstream.respond = status(503)
    client = await make_proxy(retry_config([upstream.url], {"attempts": 3}))
    assert (await client.get("/x")).status == 503
    assert upstream.count == 1


async def test_attempts_bound_the_resends(make_proxy: Any, upstream: RecordingUpstream) -> None:
    upstream.respond = status(503)
    client = await make_proxy(
        retry_config([upstream.url], {"attempts": 3, "backoff": "1ms", "on": [503]})
    )
    assert (await client.get("/x")).status == 503
    assert upstream.count == 3


async def test_ambiguous_get_is_resent_only_when_opted_in(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()
    upstream.respond = first_then(hang_until(release), echo)
    config = retry_config([upstream.url], {"attempts": 2, "on": ["ambiguous"]}, timeout="300ms")
    client = await make_proxy(config)
    response = await client.get("/x")
    release.set()
    # The whole route deadline (upstream timeout) was spent on the first attempt: no resend.
    assert response.status == 504
    assert upstream.count == 1


def context(method: str, outcome: str | None = None) -> RequestContext:
    ctx = RequestContext(make_request(method, "/pay"), "127.0.0.1")
    ctx.idempotency_outcome = outcome
    return ctx


def runtime_upstream(urls: list[str], **options: str) -> Upstream:
    config = UpstreamConfig.model_validate(
        {"targets": [{"url": url} for url in urls], "timeout": "5s", "connect_timeout": "1s",
         **options}
    )
    return Upstream("app", config)


async def test_attempts_share_the_first_attempts_deadline(upstream: RecordingUpstream) -> None:
    """A resend after a slow not-sent failure must not run past the upstream timeout: the
    idempotency lease is derived from it, and a retry of the key after the lease would run."""
    release = asyncio.Event()
    upstream.respond = hang_until(release)
    with unanswered_url() as unanswered:
        target = runtime_upstream([unanswered, upstream.url], timeout="1.5s")
        loop = asyncio.get_running_loop()
        started = loop.time()
        ctx = context("POST", "miss")
        try:
            with pytest.raises(UpstreamTimeout):
                await retry.exchange(target, Retries(attempts=3, backoff=0.001))(
                    ctx, "POST", "/pay", [], b"{}"
                )
        finally:
            release.set()
            await target.close()
    elapsed = loop.time() - started
    assert (upstream.count, ctx.resend_count) == (1, 1)  # the resend reached the second target
    assert elapsed < 1.5 + 0.5, f"the attempts ran {elapsed:.2f}s, past the 1.5s timeout"


async def test_claimed_post_is_resent_when_not_sent_only(upstream: RecordingUpstream) -> None:
    policy = Retries(attempts=3, on=["not_sent", "ambiguous", 503])
    target = runtime_upstream([refusing_url(), upstream.url])
    try:
        ctx = context("POST", "miss")
        response = await retry.exchange(target, policy)(ctx, "POST", "/pay", [], b"{}")
        response.release()
        assert (response.status, upstream.count, ctx.resend_count) == (200, 1, 1)
    finally:
        await target.close()

    upstream.respond = status(503)
    target = runtime_upstream([upstream.url])
    try:
        ctx = context("POST", "miss")
        response = await retry.exchange(target, policy)(ctx, "POST", "/pay", [], b"{}")
        response.release()
        assert (response.status, ctx.resend_count) == (503, 0), "answered: may have executed"
        assert upstream.count == 2
    finally:
        await target.close()


async def body() -> Any:
    yield b"{}"


@pytest.mark.parametrize(
    ("outcome", "payload"), [("miss", body), ("bypass", lambda: b"{}"), (None, lambda: None)]
)
async def test_streamed_or_unclaimed_bodies_are_not_resent(
    upstream: RecordingUpstream, outcome: str | None, payload: Any
) -> None:
    target = runtime_upstream([refusing_url(), upstream.url])
    ctx = context("POST", outcome)
    try:
        with pytest.raises(UpstreamNotSent):
            await retry.exchange(target, Retries(attempts=3))(ctx, "POST", "/pay", [], payload())
        assert ctx.resend_count == 0
        assert upstream.count == 0
    finally:
        await target.close()


async def test_budget_refuses_a_first_retry_when_too_many_retry(
    upstream: RecordingUpstream,
) -> None:
    target = runtime_upstream([refusing_url(), upstream.url])
    send = retry.exchange(target, Retries(attempts=2, budget=0.2, min_concurrent=1))
    target.inflight, target.retrying = 10, 2  # 2 of 10 already retrying: the budget is spent
    try:
        ctx = context("GET")
        with pytest.raises(UpstreamNotSent):
            await send(ctx, "GET", "/x", [], None)
        assert ctx.resend_count == 0
        target.retrying = 1
        response = await send(ctx, "GET", "/x", [], None)
        response.release()
        assert response.status == 200
        assert target.retrying == 1, "the retry gave its budget place back"
    finally:
        await target.close()


async def test_deadline_stops_ambiguous_resends(upstream: RecordingUpstream) -> None:
    release = asyncio.Event()
    upstream.respond = hang_until(release)
    config = UpstreamConfig.model_validate({"url": upstream.url, "timeout": "200ms"})
    target = Upstream("app", config)
    send = retry.exchange(target, Retries(attempts=5, backoff="1ms", on=["ambiguous"]))
    try:
        with pytest.raises(UpstreamTimeout):
            await send(context("GET"), "GET", "/x", [], None)
        assert upstream.count == 1
    finally:
        release.set()
        await target.close()


def test_backoff_is_jittered_and_capped() -> None:
    delays = [retry.backoff(attempt, 0.025, 0.25) for attempt in (1, 5, 10) for _ in range(50)]
    assert all(0 <= d <= 0.25 for d in delays)
    assert len(set(delays)) > 100
    assert max(retry.backoff(1, 0.025, 0.25) for _ in range(50)) <= 0.025


@pytest.mark.parametrize(
    ("method", "outcome", "payload", "resent"),
    [
        ("GET", None, None, True),
        ("TRACE", None, None, True),
        ("GET", "miss", None, False),
        ("HEAD", "miss", b"", False),
        ("GET", None, b"q", False),
        ("PUT", "miss", b"{}", False),
        ("DELETE", "miss", None, False),
        ("POST", "miss", b"{}", False),
    ],
    ids=["get", "trace", "claimed-get", "claimed-head", "get-with-body", "claimed-put",
         "claimed-delete", "claimed-post"],
)
async def test_what_may_have_reached_the_upstream_is_resent_only_when_safe_to_repeat(
    upstream: RecordingUpstream, method: str, outcome: str | None, payload: bytes | None,
    resent: bool,
) -> None:
    """Issue 13: an answered 503 (and any ambiguous failure) may have executed the request, so
    only a safe method without a body and without an idempotency claim is sent again."""
    upstream.respond = status(503)
    target = runtime_upstream([upstream.url])
    policy = Retries(attempts=2, backoff=0.001, on=["not_sent", "ambiguous", 503])
    try:
        ctx = context(method, outcome)
        response = await retry.exchange(target, policy)(ctx, method, "/pay", [], payload)
        response.release()
        assert response.status == 503
        assert (upstream.count, ctx.resend_count) == ((2, 1) if resent else (1, 0))
    finally:
        await target.close()
