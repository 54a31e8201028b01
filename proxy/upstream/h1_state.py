"""The vocabulary of one upstream HTTP/1.1 exchange, apart from the protocol that runs it
(proxy/upstream/h1_connection.py): where the exchange stands, why a connection is discarded
under the one-response-per-connection rule, and how a reused connection that went stale is
told apart from a failure."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class State(StrEnum):
    """Where the exchange on a connection stands (h11-style: one explicit state, not flags)."""

    IDLE = "idle"  # no exchange: the upstream has nothing to say; any byte is a violation
    WAITING = "waiting"  # request (being) sent, no final head yet; 1xx interim heads may come
    BODY = "body"  # final head in, body arriving
    DONE = "done"  # final response complete: not one more byte may arrive
    FAILED = "failed"  # the exchange failed (`error`); the connection is closed


# The states as module globals, which the per-exchange code reads: on Python 3.11 reading
# `State.WAITING` goes through EnumType.__getattr__'s slot, a call through the metaclass (about
# 0.5k instructions against a few dozen for a global; docs/performance.md). 3.12 dropped it.
IDLE, WAITING, BODY, DONE, FAILED = State.IDLE, State.WAITING, State.BODY, State.DONE, State.FAILED


class Violation(StrEnum):
    """Why a connection was discarded: the `reason` of the counter and the event."""

    EXTRA_BYTES = "extra_bytes"  # bytes after a complete response (same read or later)
    BODY_NOT_ALLOWED = "body_not_allowed"  # bytes after a 204/304/HEAD response head
    IDLE_BYTES = "idle_bytes"  # bytes on a pooled connection with no request outstanding


Report = Callable[[Violation], None]


class Stale(Exception):
    """A reused keep-alive connection closed before any response byte arrived."""
