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
from collections.abc import Awaitable, Callable, Coroutine, Sequence

from proxy.config import Limits, Route
from proxy.config import Store as StoreConfig
from proxy.http import body
from proxy.http.context import Decision, Handler, IdempotencyOutcome, RequestContext
from proxy.http.headers import SERVER, VIA
from proxy.http.problem import ProblemType, problem, retry_after
from proxy.http.response import Response, StreamResponse
from proxy.idempotency.fingerprint import fingerprint_off_loop
from proxy.idempotency.jcs import JsonTooDeep
from proxy.idempotency.keys import KeyHasher, parse_key, record_key
from proxy.idempotency.recorder import ResponseRecorder, decide
from proxy.observability.events import emit
from proxy.stores.base import (
    IN_FLIGHT,
    INDETERMINATE,
    Lease,
    Record,
    Store,
    StoreError,
    StoreTimeout,
)

HEADER = "Idempotency-Key"
# Lease = upstream timeout + this + two store budgets (claim and finalise).
LEASE_MARGIN = 1.0
FIRST_POLL, MAX_POLL = 0.02, 0.25
MAX_BACKGROUND = 256

# Members read per request, as globals: on Python 3.11 an enum class attribute is read through
# EnumType.__getattr__'s slot, a call (docs/performance.md, "Enum members and config fields").
_BYPASS, _MISS, _REPLAY = (
    IdempotencyOutcome.BYPASS, IdempotencyOutcome.MISS, IdempotencyOutcome.REPLAY
)
_COMPLETE, _RELEASE = Decision.COMPLETE, Decision.RELEASE

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



def _track(
    work: Coroutine[None, None, None], loop: asyncio.AbstractEventLoop
) -> asyncio.Task[None]:
    task = loop.create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def _spawn(work: Coroutine[None, None, None]) -> None:
    if len(_background) >= MAX_BACKGROUND:
        work.close()  # the record still ends with its lease; only the early cleanup is lost
        return
    _track(work, asyncio.get_running_loop())


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


def _replay(ctx: RequestContext, status: int, stored: Sequence[tuple[str, str]],
            payload: bytes) -> Response:
    response = Response(status=status, body=payload, headers=stored)  # the one copy
    headers = response.headers
    headers["Idempotent-Replayed"] = "true"
    headers["X-Trace-Id"] = ctx.trace_id
    headers["Server"] = SERVER
    # A replay passed through the proxy as its original did; a copy stored with a route's extra
    # `Via` already ends with ours.
    if headers.getall("Via", [])[-1:] != [VIA]:
        headers.add("Via", VIA)
    ctx.status = status
    ctx.response_body_size = len(payload)
    return response


class IdempotencyStage:
    """The idempotency stage of one route, in named phases (Pingora style):

    `__call__` takes the key (`_key`) and the fingerprint (`_fingerprint`), then claims the
    record; the first claimant runs `_execute` (forward, then `_finalise` commits the outcome
    before the last byte leaves); everyone else gets `_answer` (replay or a problem).
    Everything derived from the route's policy is resolved here, once per config load.
    """

    __slots__ = (
        "extra", "fail_open", "hasher", "hold", "json_depth", "lease", "loop", "max_body",
        "methods", "next", "read_limit", "read_timeout", "required", "route_name",
        "scope_header", "store", "store_5xx", "terms", "ttl", "wait_timeout",
    )

    def __init__(
        self,
        next_handler: Handler,
        *,
        route: Route,
        store: Store,
        store_config: StoreConfig,
        limits: Limits,
        hasher: KeyHasher,
        lease: float,
    ) -> None:
        policy = route.idempotency
        self.next = next_handler
        self.store = store
        # Plain attributes, not the pydantic model's: read per request (docs/performance.md).
        self.read_limit, self.read_timeout, self.json_depth = (
            limits.max_request_body, limits.body_timeout, limits.max_json_depth
        )
        self.hasher = hasher
        self.lease = lease
        self.methods = frozenset(policy.methods)
        self.extra = frozenset(name.lower() for name in policy.replay_headers)
        self.scope_header = policy.scope.header if policy.scope is not None else None
        self.route_name = route.name
        self.fail_open = store_config.on_error == "fail_open"
        self.required, self.ttl, self.max_body, self.store_5xx = (
            policy.required, policy.ttl, policy.max_body, policy.store_5xx
        )
        self.wait_timeout = policy.wait_timeout if policy.on_concurrent == "wait" else None
        self.hold = policy.on_indeterminate == "hold"
        self.terms = Lease(lease, policy.ttl, self.hold, holder())
        # Bound at the first keyed request: on Python 3.11 every get_running_loop() is a
        # getpid() system call.
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, ctx: RequestContext) -> StreamResponse:
        if ctx.request.method not in self.methods:
            return await self.next(ctx)
        key = self._key(ctx)
        if key is None:  # no key on a route that does not require one
            ctx.idempotency_outcome = _BYPASS
            return await self.next(ctx)
        if not isinstance(key, str):
            return key
        fp = await self._fingerprint(ctx, key)
        if not isinstance(fp, str):
            return fp
        # Unique, not secret (it never leaves the proxy and the store: it tells owners apart),
        # so not from the OS: os.urandom is a syscall per request.
        token = f"{random.getrandbits(128):032x}"
        storage = ctx.idempotency_record
        wait_until: float | None = None
        poll = FIRST_POLL
        while True:
            try:
                record = await self.store.claim(storage, token, fp, self.terms)
            except StoreError as exc:
                return await self._store_failed(ctx, exc, storage, token)
            if record is None:
                ctx.idempotency_outcome = _MISS
                return await self._execute(ctx, storage, token)
            if (record.state != IN_FLIGHT or record.fingerprint != fp
                    or self.wait_timeout is None):
                return self._answer(ctx, record, fp)
            # on_concurrent: wait. Claiming again both polls and takes over a released key.
            now = asyncio.get_running_loop().time()
            if wait_until is None:
                wait_until = now + self.wait_timeout
            remaining = wait_until - now
            if remaining <= 0:
                return self._answer(ctx, record, fp)
            await asyncio.sleep(min(poll, remaining))
            poll = min(poll * 2, MAX_POLL)

    def _key(self, ctx: RequestContext) -> str | Response | None:
        """The parsed Idempotency-Key, None when absent and optional, or the refusal."""
        request = ctx.request
        values = request.headers.getall(HEADER, ())
        if not values:
            if not self.required:
                return None
            return _refuse(ctx, ProblemType.KEY_MISSING,
                           f"{request.method} requests on this route need an Idempotency-Key "
                           "header; generate one per operation and reuse it for retries",
                           "idempotency_key_missing")
        key = parse_key(values[0]) if len(values) == 1 else None
        if key is None:
            return _refuse(ctx, ProblemType.KEY_INVALID,
                           "send exactly one Idempotency-Key of 1-255 visible ASCII characters, "
                           "bare or as a quoted string", "idempotency_key_invalid")
        return key

    async def _fingerprint(self, ctx: RequestContext, key: str) -> str | Response:
        """Read the body, derive the record id (`ctx.idempotency_record`) and the fingerprint."""
        request = ctx.request
        payload = b""
        if request.body_exists:
            try:
                payload = await body.read(ctx, self.read_limit, self.read_timeout)
            except body.BodyError as exc:
                response = problem(exc.problem, str(exc), ctx.trace_id)
                response.force_close()
                return response
        ctx.body = payload
        hasher = self.hasher
        header = self.scope_header
        scope_value = None if header is None else request.headers.get(header)
        storage, identity = record_key(hasher, self.route_name, key, scope_value)
        if identity:
            ctx.user_hash = hasher.log_hash(identity)
        ctx.idempotency_record = storage
        ctx.idempotency_key_hash = hasher.log_hash(storage)
        try:
            return await fingerprint_off_loop(
                request.method,
                ctx.path,
                request.query_string,
                request.headers.get("Content-Type"),
                payload,
                self.json_depth,
            )
        except JsonTooDeep as exc:
            return _refuse(ctx, ProblemType.JSON_TOO_DEEP,
                           f"{exc}; an Idempotency-Key needs a body that can be fingerprinted",
                           "request_json_too_deep")

    def _answer(self, ctx: RequestContext, record: Record, fp: str) -> Response:
        """The answer to a request whose key already has another request's record."""
        if record.lease_expired_now:  # this claim found the holder dead: said once, here
            emit("idempotency_lease_expired", "warning", route=self.route_name,
                 key_hash=ctx.idempotency_key_hash, holder=record.holder,
                 detail="the holder of this key stopped before finishing: held indeterminate")
        if record.fingerprint != fp:
            ctx.idempotency_outcome = IdempotencyOutcome.MISMATCH
            return _refuse(ctx, ProblemType.PAYLOAD_MISMATCH,
                           "this Idempotency-Key was used for a different request (method, path, "
                           "query or body); use a new key for a new operation",
                           "idempotency_mismatch")
        if record.state == IN_FLIGHT:
            ctx.idempotency_outcome = IdempotencyOutcome.CONFLICT
            return _refuse(ctx, ProblemType.IN_PROGRESS,
                           "a request with this Idempotency-Key is still being processed; retry "
                           "with the same key after Retry-After", "idempotency_in_progress",
                           [retry_after(min(record.lease_remaining, IN_PROGRESS_RETRY_AFTER))])
        if record.state == INDETERMINATE:
            ctx.idempotency_outcome = IdempotencyOutcome.INDETERMINATE
            if self.hold:  # no Retry-After: nothing changes for this key until an operator acts
                return _refuse(ctx, ProblemType.OUTCOME_INDETERMINATE,
                               INDETERMINATE_DETAIL, "idempotency_indeterminate")
            return _refuse(ctx, ProblemType.OUTCOME_INDETERMINATE,
                           "the original request with this Idempotency-Key reached the upstream "
                           "but its outcome is unknown; this route runs it again after "
                           "Retry-After (on_indeterminate: release_after_lease)",
                           "idempotency_indeterminate", [retry_after(record.lease_remaining)])
        stored = record.response
        assert stored is not None
        if not stored.replayable:
            ctx.idempotency_outcome = IdempotencyOutcome.CONFLICT
            return _refuse(ctx, ProblemType.RESPONSE_NOT_REPLAYABLE,
                           f"the request already ran (status {stored.status}) but its response "
                           f"was not stored for replay (larger than {self.max_body} bytes, or "
                           "the memory store was near store.max_bytes)",
                           "idempotency_not_replayable")
        ctx.idempotency_outcome = _REPLAY
        return _replay(ctx, stored.status, stored.headers, stored.body)

    async def _execute(self, ctx: RequestContext, key: str, token: str) -> StreamResponse:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        lease_end = loop.time() + self.lease
        recorder = ResponseRecorder(self.max_body, self.extra)

        async def commit() -> None:
            # Shielded: a cancelled handler must still leave a finished record behind.
            work = self._finalise(ctx, recorder, key, token, lease_end)
            await asyncio.shield(_track(work, loop))

        recorder.on_commit = commit
        ctx.tap = recorder
        try:
            return await self.next(ctx)
        finally:
            await recorder.commit()  # when forward did not (an error answer, a cut response)

    async def _finalise(self, ctx: RequestContext, recorder: ResponseRecorder, key: str,
                        token: str, lease_end: float) -> None:
        decision = ctx.idempotency_decision = decide(
            ctx.upstream_outcome, recorder.status, self.store_5xx
        )
        store = self.store
        op: Callable[[], Awaitable[bool]]
        if decision == _COMPLETE:
            stored, ttl = recorder.stored(), self.ttl
            op = lambda: store.complete(key, token, stored, ttl)  # noqa: E731
        elif decision == _RELEASE:
            op = lambda: store.release(key, token)  # noqa: E731
        else:
            op = lambda: store.mark_indeterminate(key, token)  # noqa: E731
        try:
            await op()
        except StoreError:
            ctx.error_type = ctx.error_type or "store_unavailable"
            _spawn(_until_lease_end(op, lease_end))

    async def _store_failed(self, ctx: RequestContext, exc: StoreError, key: str, token: str
                            ) -> StreamResponse:
        ctx.idempotency_outcome = IdempotencyOutcome.STORE_ERROR
        if isinstance(exc, StoreTimeout):  # our claim may still land: take it back
            store = self.store
            lease_end = asyncio.get_running_loop().time() + self.lease
            _spawn(_until_lease_end(lambda: store.release(key, token), lease_end))
        if self.fail_open:
            ctx.error_type = "store_unavailable"
            return await self.next(ctx)
        return _refuse(ctx, ProblemType.STORE_UNAVAILABLE,
                       f"the idempotency store did not answer ({exc}); the request was not "
                       "forwarded, retry with the same key", "store_unavailable",
                       [retry_after(1)])


def _refuse(ctx: RequestContext, kind: ProblemType, detail: str, error_type: str,
            headers: list[tuple[str, str]] | None = None) -> Response:
    ctx.error_type = error_type
    return problem(kind, detail, ctx.trace_id, headers or ())
