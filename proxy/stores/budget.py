"""The memory store's byte budget: what its records cost, and who may spend the last of it.

Costs are estimates of the Python heap the store holds, calibrated with tracemalloc against
MemoryStore itself (tests/idempotency/test_budget.py re-measures them on every run):

- a claim reserves `CLAIM_BYTES`: the record (its key, the owner token and the fingerprint,
  its share of the record dict and of the expiry schedule) with or without a response that
  holds no bytes. Completing a claim as `not replayable` therefore never needs more memory, so
  a request that ran can always be recorded as having run.
- a response kept for replay adds its body and its stored headers, one for one: both are
  copied into the record's single bytes object (proxy/stores/packed.py).

Policy at the limit, so that one caller cannot lock the others out:

- claims are refused (the store is full) only when `max_bytes` itself would be exceeded;
- a response of at most `SMALL_RESPONSE` bytes is kept while it fits under `max_bytes`;
- a larger response is kept only while the store stays under `BULK_SHARE` of `max_bytes`.

A response that is not kept leaves its record `completed, not replayable`: a retry is answered
422 `response-not-replayable`, never executed again. Large responses can therefore fill at most
`BULK_SHARE` of the store; the rest stays for everyone's claims and small responses.
"""

from __future__ import annotations

from proxy.observability.events import emit

# Measured against MemoryStore itself (tests/idempotency/test_budget.py re-measures it): a record
# with the stage's 40-hex-digit key, 32-hex-digit owner token and 40-hex-digit fingerprint
# costs its key string (89 bytes), its share of the record dict (28-60 bytes as the dict fills
# and grows), its packed bytes without a response (33 + 40 + 16 + 20, see
# proxy/stores/packed.py) and its slot in the expiry schedule (8 bytes). Rounded up to cover
# the allocator's rounding too, so that RSS per record stays under it.
CLAIM_BYTES = 300
SMALL_RESPONSE = 4096
BULK_SHARE = 0.75
# `store_memory_high` once the store crosses HIGH_WATER (only claims and small responses get
# there: new keys will soon be refused for everyone); `store_memory_normal` once it is back under
# LOW_WATER (the gap keeps a store that hovers at the mark from logging on every request).
# Large responses that are not kept are counted, not logged (idemproxy_store_memory_refusals).
HIGH_WATER = 0.9
LOW_WATER = 0.8


class ByteBudget:
    """Bytes held against `limit`; read by /metrics from another thread (plain int reads)."""

    __slots__ = ("_high", "limit", "refused_claims", "unkept_responses", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused_claims = 0
        self.unkept_responses = 0
        self._high = False

    def claim_fits(self) -> bool:
        return self.used + CLAIM_BYTES <= self.limit

    def claim(self) -> None:
        """Spend a claim's reservation (after `claim_fits`)."""
        self.used += CLAIM_BYTES
        self._watch()

    def refuse_claim(self) -> None:
        self.refused_claims += 1

    def keep(self, cost: int) -> bool:
        """Whether a response of `cost` bytes (its stored headers and body) may be kept for
        replay; its bytes are spent when it may. When not, the record keeps its status alone,
        `not replayable`."""
        if cost:
            cap = self.limit if cost <= SMALL_RESPONSE else int(self.limit * BULK_SHARE)
            if self.used + cost > cap:
                self.unkept_responses += 1
                return False
            self.used += cost
            self._watch()
        return True

    def free(self, kept: int) -> None:
        """Return a removed record's bytes: its claim and the `kept` bytes of its response."""
        self.used -= CLAIM_BYTES + kept
        self._watch()

    def clear(self) -> None:
        """The store is closing: nothing to report."""
        self.used = 0
        self._high = False

    def _watch(self) -> None:
        if not self._high and self.used >= self.limit * HIGH_WATER:
            self._high = True
            emit("store_memory_high", "warning", used_bytes=self.used, limit_bytes=self.limit,
                 detail=f"the memory store holds {self.used / self.limit:.0%} of store.max_bytes:"
                 " new Idempotency-Keys are refused (503) once it is full; bound keys per "
                 "client with a route quota, or raise store.max_bytes with the memory limit")
        elif self._high and self.used < self.limit * LOW_WATER:
            self._high = False
            emit("store_memory_normal", used_bytes=self.used, limit_bytes=self.limit)
