"""Admin: look up and release one Idempotency-Key record (the operator's way out of
`indeterminate`, see docs/guarantees.md).

Both are POSTs with a JSON body `{"route": ..., "key": ..., "scope": ...}`: the scope value is a
secret (an API key, a user token), so it never appears in a URL or a log line. The record id is
derived exactly as the idempotency stage does (`proxy.idempotency.keys.record_key`). Every
release writes an `idempotency_key_released` event with the log hash of the record, never the
key or the scope. The store belongs to the data plane's loop; the handlers run on the admin
thread and hand the store calls over (`run_on`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web

from proxy.admin.problem import problem
from proxy.admin.thread import run_on
from proxy.http.problem import ProblemType
from proxy.idempotency.keys import parse_key, record_key
from proxy.observability.events import emit, iso_time
from proxy.pipeline.runtime import AdminHandler, DataPlane, Runtime, same_origin_only
from proxy.stores.base import Record, StoreError

LOOKUP = "/admin/keys/lookup"
RELEASE = "/admin/keys/release"


class _Refused(Exception):
    def __init__(self, kind: ProblemType, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def describe(record: Record, key_hash: str) -> dict[str, Any]:
    """The record as the operator sees it (no body bytes: they may hold personal data)."""
    response = record.response
    return {
        "key_hash": key_hash,
        "state": record.state,
        "created": iso_time(record.created) if record.created else None,
        "expires_in_s": round(record.remaining, 3),
        "lease_remaining_s": round(record.lease_remaining, 3),
        "holder": record.holder or None,
        "fingerprint": record.fingerprint,
        "response": None if response is None else {
            "status": response.status,
            "replayable": response.replayable,
            "body_bytes": len(response.body),
        },
    }


class KeyActions:
    def __init__(
        self,
        runtime: Callable[[], Runtime],
        run: Callable[[Coroutine[Any, Any, Any]], Coroutine[Any, Any, Any]],
    ) -> None:
        self._runtime = runtime
        self._run = run

    def actions(self) -> dict[str, AdminHandler]:
        return {
            LOOKUP: same_origin_only(self._lookup),
            RELEASE: same_origin_only(self._release),
        }

    async def _target(self, request: web.BaseRequest) -> tuple[Runtime, str, str]:
        """(runtime, storage key, log hash) named by the request body. The log hash is the
        access log's `idempotency.key_hash` (with a configured `logging.hash_salt`)."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise _Refused(ProblemType.ADMIN_REQUEST_INVALID,
                           'send a JSON object {"route": ..., "key": ..., "scope": ...}')
        route_name, raw_key, scope = body.get("route"), body.get("key"), body.get("scope")
        if not isinstance(route_name, str) or not isinstance(raw_key, str) or not (
            scope is None or isinstance(scope, str)
        ):
            raise _Refused(ProblemType.ADMIN_REQUEST_INVALID,
                           "route and key are strings; scope is a string or absent")
        runtime = self._runtime()
        route = next((r for r in runtime.config.routes if r.name == route_name), None)
        if route is None or not route.idempotency.enabled:
            raise _Refused(ProblemType.ADMIN_ROUTE_UNKNOWN,
                           f"no route named {route_name!r} with idempotency enabled")
        key = parse_key(raw_key)
        if key is None:
            raise _Refused(ProblemType.ADMIN_REQUEST_INVALID,
                           "key is not a valid Idempotency-Key value")
        storage, _ = record_key(runtime.hasher, route_name, key, scope)
        return runtime, storage, runtime.hasher.log_hash(storage)

    async def _lookup(self, request: web.BaseRequest) -> web.Response:
        try:
            runtime, storage, key_hash = await self._target(request)
            record = await self._run(runtime.store.get(storage))
        except _Refused as refused:
            return _problem(refused)
        except StoreError as exc:
            return _store_failed(exc)
        if record is None:
            return _problem(_absent())
        return _json(200, describe(record, key_hash))

    async def _release(self, request: web.BaseRequest) -> web.Response:
        try:
            runtime, storage, key_hash = await self._target(request)
            record, released = await self._run(_discard(runtime, storage, key_hash))
        except _Refused as refused:
            return _problem(refused)
        except StoreError as exc:
            return _store_failed(exc)
        if record is None:
            return _problem(_absent())
        if not released:
            return _problem(_Refused(ProblemType.ADMIN_KEY_IN_FLIGHT,
                "the record's holder is still working on it (its lease has "
                f"{record.lease_remaining:.1f}s left); look it up again after the lease"))
        return _json(200, {"released": True, "record": describe(record, key_hash)})


async def _discard(runtime: Runtime, storage: str, key_hash: str) -> tuple[Record | None, bool]:
    """Release and log it, on the main loop (where the log sink is written)."""
    record, released = await runtime.store.discard(storage)
    if record is not None and released:
        emit("idempotency_key_released", "warning", key_hash=key_hash, by="admin",
             previous_state=record.state, holder=record.holder or None,
             status=record.response.status if record.response is not None else None)
    return record, released


def _absent() -> _Refused:
    return _Refused(ProblemType.ADMIN_KEY_NOT_FOUND,
                    "no record for this route, key and scope: never seen, released or expired")


def _store_failed(exc: StoreError) -> web.Response:
    return _problem(_Refused(ProblemType.STORE_UNAVAILABLE,
                             f"the idempotency store did not answer ({exc})"))


def _problem(refused: _Refused) -> web.Response:
    return problem(refused.kind, str(refused), os.urandom(16).hex())


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def for_plane(plane: DataPlane, main: asyncio.AbstractEventLoop) -> KeyActions:
    """The key actions of one process, run against its current runtime on its main loop."""
    return KeyActions(lambda: plane.runtime, lambda coro: run_on(main, coro))


class Worker(Protocol):
    async def ask(
        self, method: str, path: str, accept: str = "", body: bytes | None = None
    ) -> tuple[int, bytes] | None: ...


def forwarded(workers: Sequence[Worker]) -> dict[str, AdminHandler]:
    """The supervisor's key actions: answered by the first worker that answers (workers share
    one Redis store, so any of them sees every record)."""

    async def forward(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        for worker in workers:
            answer = await worker.ask("POST", request.path, body=body)
            if answer is not None:
                status, reply = answer
                kind = "application/json" if status == 200 else "application/problem+json"
                return web.Response(status=status, body=reply, content_type=kind)
        return _store_failed(StoreError("no worker answered"))

    return {LOOKUP: same_origin_only(forward), RELEASE: same_origin_only(forward)}
