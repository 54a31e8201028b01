"""Stage: claim the Idempotency-Key record, forward once, then complete or release it; answer
retries from the record (replay, 409 in progress or indeterminate, 422 mismatch).

Per keyed request: one store round trip to claim (which also returns an existing record for
replay) and one to finalise. Finalisation runs before the last byte of the response goes to the
client (so a retry sent the moment the client has its answer finds the record), in a shielded
task, so it happens even when the client goes away; if the store fails then, the response is
still delivered and the finalisation retried in the background until the lease ends (after
which the key is indeterminate).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Awaitable, Callable, Coroutine

from aiohttp import web
from multidict import CIMultiDict

from proxy.config import Limits, Route
from proxy.config import Store as StoreConfig
from proxy.http import body
from proxy.http.context import Decision, Handler, IdempotencyOutcome, RequestContext
from proxy.http.headers import SERVER, VIA
from proxy.http.problem import ProblemType, problem, retry_after
from proxy.idempotency.fingerprint import fingerprint_off_loop
from proxy.idempotency.jcs import JsonTooDeep
from proxy.idempotency.keys import KeyHasher, parse_key, record_key
from proxy.idempotency.recorder import ResponseRecorder, decide
from proxy.observability.events import emit
from proxy.stores.base import Lease, Record, RecordState, Store, StoreError, StoreTimeout

HEADER = "Idempotency-Key"
# Lease = upstream timeout + this + two store budgets (claim and finalise).
LEASE_MARGIN = 1.0
FIRST_POLL, MAX_POLL = 0.02, 0.25
MAX_BACKGROUND = 256

# Finalisations and releases still running after their request returned.
_background: set[asyncio.Task[None]] = set()


# The original may finish at any moment: a duplicate is told to come back soon for the replay,
# not to wait out the whole lease.
IN_PROGRESS_RETRY_AFTER = 1.0

INDETERMINATE_DETAIL = (
    "the original request with this Idempotency-Key reached the upstream but its outcome is "
    "unknown (timeout, broken connection or a proxy that stopped): the operation may or may not "
    "have happened. Retrying the same key will not run it again; check the operation's state "
    "with the service, or ask the operator to release the key"
)


def holder() -> str:
    """Who holds a claim, for the admin lookup: host and process (a worker is a process)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def lease_for(upstream_timeout: float, store_timeout: float) -> float:
    return upstream_timeout + LEASE_MARGIN + 2 * store_timeout



def _track(work: Coroutine[None, None, None]) -> asyncio.Task[None]:
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def _spawn(work: Coroutine[None, None, None]) -> None:
    if len(_background) >= MAX_BACKGROUND:
        work.close()  # the record still ends with its lease; only the early cleanup is lost
        return
    _track(work)


async def _until_lease_end(op: Callable[[], Awaitable[object]], lease_end: float) -> None:
    """Repeat an owner-checked (so repeatable) store operation until the store answers."""
    loop = asyncio.get_running_loop()
    delay = 0.1
    while loop.time() + delay < lease_end:
        await asyncio.sleep(delay)
        try:
            await op()
        except StoreError:
            delay = min(delay * 2, 2.0)
        else:
            return


def _replay(ctx: RequestContext, status: int, headers: CIMultiDict[str], payload: bytes
            ) -> web.Response:
    headers["Idempotent-Replayed"] = "true"
    headers["X-Trace-Id"] = ctx.trace_id
    headers["Server"] = SERVER
    # A replay passed through the proxy as its original did; a copy stored with a route's extra
    # `Via` already ends with ours.
    if headers.getall("Via", [])[-1:] != [VIA]:
        headers.add("Via", VIA)
    ctx.status = status
    ctx.response_body_size = len(payload)
    return web.Response(status=status, body=payload, headers=headers)


def stage(
    next_handler: Handler,
    *,
    route: Route,
    store: Store,
    store_config: StoreConfig,
    limits: Limits,
    hasher: KeyHasher,
    lease: float,
) -> Handler:
    policy = route.idempotency
    methods = frozenset(policy.methods)
    extra = frozenset(name.lower() for name in policy.replay_headers)
    scope_header = policy.scope.header if policy.scope is not None else None
    route_name = route.name
    fail_open = store_config.on_error == "fail_open"
    required, ttl, max_body, store_5xx = (
        policy.required, policy.ttl, policy.max_body, policy.store_5xx
    )
    wait_timeout = policy.wait_timeout if policy.on_concurrent == "wait" else None
    hold = policy.on_indeterminate == "hold"
    terms = Lease(lease, ttl, hold, holder())

    def refuse(ctx: RequestContext, kind: ProblemType, detail: str, error_type: str,
               headers: list[tuple[str, str]] | None = None) -> web.Response:
        ctx.error_type = error_type
        return problem(kind, detail, ctx.trace_id, headers or ())

    def answer(ctx: RequestContext, record: Record, fp: str) -> web.Response:
        """The answer to a request whose key already has another request's record."""
        if record.lease_expired_now:  # this claim found the holder dead: said once, here
            emit("idempotency_lease_expired", "warning", route=route_name,
                 key_hash=ctx.idempotency_key_hash, holder=record.holder,
                 detail="the holder of this key stopped before finishing: held indeterminate")
        if record.fingerprint != fp:
            ctx.idempotency_outcome = IdempotencyOutcome.MISMATCH
            return refuse(ctx, ProblemType.PAYLOAD_MISMATCH,
                          "this Idempotency-Key was used for a different request (method, path, "
                          "query or body); use a new key for a new operation",
                          "idempotency_mismatch")
        if record.state == RecordState.IN_FLIGHT:
            ctx.idempotency_outcome = IdempotencyOutcome.CONFLICT
            return refuse(ctx, ProblemType.IN_PROGRESS,
                          "a request with this Idempotency-Key is still being processed; retry "
                          "with the same key after Retry-After", "idempotency_in_progress",
                          [retry_after(min(record.lease_remaining, IN_PROGRESS_RETRY_AFTER))])
        if record.state == RecordState.INDETERMINATE:
            ctx.idempotency_outcome = IdempotencyOutcome.INDETERMINATE
            if hold:  # no Retry-After: nothing changes for this key until an operator acts
                return refuse(ctx, ProblemType.OUTCOME_INDETERMINATE,
                              INDETERMINATE_DETAIL, "idempotency_indeterminate")
            return refuse(ctx, ProblemType.OUTCOME_INDETERMINATE,
                          "the original request with this Idempotency-Key reached the upstream "
                          "but its outcome is unknown; this route runs it again after "
                          "Retry-After (on_indeterminate: release_after_lease)",
                          "idempotency_indeterminate", [retry_after(record.lease_remaining)])
        stored = record.response
        assert stored is not None
        if not stored.replayable:
            ctx.idempotency_outcome = IdempotencyOutcome.CONFLICT
            return refuse(ctx, ProblemType.RESPONSE_NOT_REPLAYABLE,
                          f"the request already ran (status {stored.status}) but its response "
                          f"was not stored for replay (larger than {max_body} bytes, or the "
                          "memory store was near store.max_bytes)",
                          "idempotency_not_replayable")
        ctx.idempotency_outcome = IdempotencyOutcome.REPLAY
        return _replay(ctx, stored.status, CIMultiDict(stored.headers), stored.body)

    async def finalise(ctx: RequestContext, recorder: ResponseRecorder, key: str, token: str,
                       lease_end: float) -> None:
        decision = ctx.idempotency_decision = decide(
            ctx.upstream_outcome, recorder.status, store_5xx
        )
        op: Callable[[], Awaitable[bool]]
        if decision == Decision.COMPLETE:
            stored = recorder.stored()
            op = lambda: store.complete(key, token, stored, ttl)  # noqa: E731
        elif decision == Decision.RELEASE:
            op = lambda: store.release(key, token)  # noqa: E731
        else:
            op = lambda: store.mark_indeterminate(key, token)  # noqa: E731
        try:
            await op()
        except StoreError:
            ctx.error_type = ctx.error_type or "store_unavailable"
            _spawn(_until_lease_end(op, lease_end))

    async def execute(ctx: RequestContext, key: str, token: str) -> web.StreamResponse:
        lease_end = asyncio.get_running_loop().time() + lease
        recorder = ResponseRecorder(max_body, extra)

        async def commit() -> None:
            # Shielded: a cancelled handler must still leave a finished record behind.
            await asyncio.shield(_track(finalise(ctx, recorder, key, token, lease_end)))

        recorder.on_commit = commit
        ctx.tap = recorder
        try:
            return await next_handler(ctx)
        finally:
            await recorder.commit()  # when forward did not (an error answer, a cut response)

    async def store_failed(ctx: RequestContext, exc: StoreError, key: str, token: str
                           ) -> web.StreamResponse:
        ctx.idempotency_outcome = IdempotencyOutcome.STORE_ERROR
        if isinstance(exc, StoreTimeout):  # our claim may still land: take it back
            lease_end = asyncio.get_running_loop().time() + lease
            _spawn(_until_lease_end(lambda: store.release(key, token), lease_end))
        if fail_open:
            ctx.error_type = "store_unavailable"
            return await next_handler(ctx)
        return refuse(ctx, ProblemType.STORE_UNAVAILABLE,
                      f"the idempotency store did not answer ({exc}); the request was not "
                      "forwarded, retry with the same key", "store_unavailable",
                      [retry_after(1)])

    async def handle(ctx: RequestContext) -> web.StreamResponse:
        request = ctx.request
        if request.method not in methods:
            return await next_handler(ctx)
        values = request.headers.getall(HEADER, ())
        if not values:
            if required:
                return refuse(ctx, ProblemType.KEY_MISSING,
                              f"{request.method} requests on this route need an Idempotency-Key "
                              "header; generate one per operation and reuse it for retries",
                              "idempotency_key_missing")
            ctx.idempotency_outcome = IdempotencyOutcome.BYPASS
            return await next_handler(ctx)
        key = parse_key(values[0]) if len(values) == 1 else None
        if key is None:
            return refuse(ctx, ProblemType.KEY_INVALID,
                          "send exactly one Idempotency-Key of 1-255 visible ASCII characters, "
                          "bare or as a quoted string", "idempotency_key_invalid")
        payload = b""
        if request.body_exists:
            try:
                payload = await body.read(ctx, limits.max_request_body, limits.body_timeout)
            except body.BodyError as exc:
                response = problem(exc.problem, str(exc), ctx.trace_id)
                response.force_close()
                return response
        ctx.body = payload
        scope_value = None if scope_header is None else request.headers.get(scope_header)
        storage, identity = record_key(hasher, route_name, key, scope_value)
        if identity:
            ctx.user_hash = hasher.log_hash(identity)
        ctx.idempotency_key_hash = hasher.log_hash(storage)
        try:
            fp = await fingerprint_off_loop(
                request.method,
                ctx.path,
                request.rel_url.raw_query_string,
                request.headers.get("Content-Type"),
                payload,
                limits.max_json_depth,
            )
        except JsonTooDeep as exc:
            return refuse(ctx, ProblemType.JSON_TOO_DEEP,
                          f"{exc}; an Idempotency-Key needs a body that can be fingerprinted",
                          "request_json_too_deep")
        # Unique, not secret (it never leaves the proxy and the store: it tells owners apart),
        # so not from the OS: os.urandom is a syscall per request.
        token = f"{random.getrandbits(128):032x}"
        wait_until: float | None = None
        poll = FIRST_POLL
        while True:
            try:
                record = await store.claim(storage, token, fp, terms)
            except StoreError as exc:
                return await store_failed(ctx, exc, storage, token)
            if record is None:
                ctx.idempotency_outcome = IdempotencyOutcome.MISS
                return await execute(ctx, storage, token)
            if (record.state != RecordState.IN_FLIGHT or record.fingerprint != fp
                    or wait_timeout is None):
                return answer(ctx, record, fp)
            # on_concurrent: wait. Claiming again both polls and takes over a released key.
            now = asyncio.get_running_loop().time()
            if wait_until is None:
                wait_until = now + wait_timeout
            remaining = wait_until - now
            if remaining <= 0:
                return answer(ctx, record, fp)
            await asyncio.sleep(min(poll, remaining))
            poll = min(poll * 2, MAX_POLL)

    return handle
