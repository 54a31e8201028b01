"""When the memory store's records expire, kept in a shape the garbage collector skips.

Keys are grouped by the whole second their record expires in (rounded up), each second's keys
in one tuple. A tuple of strings is untracked by the collector once a collection has seen it,
so a million scheduled expiries cost a full collection one visit per second of retention
rather than one per record, and 8 bytes each (the key string is the record dict's own). A heap
of (deadline, key) tuples in a list cost ~90 bytes a record and a visit each.

New entries wait in a flat list and array until the next `take` groups them: adding to a
second's tuple copies it, so that is done once per sweep for all of the second's new keys,
not once per key.

An entry may be stale (the record was removed, or its deadline moved): the store checks the
record itself and hands back those whose deadline moved later (`add` again).
"""

from __future__ import annotations

import math
from array import array


class Expiries:
    __slots__ = ("_buckets", "_new_keys", "_new_seconds", "_swept")

    def __init__(self, now: float) -> None:
        self._buckets: dict[int, tuple[str, ...]] = {}
        self._new_keys: list[str] = []
        self._new_seconds = array("q")
        self._swept = math.floor(now)  # every second up to this one was taken

    def add(self, key: str, when: float) -> None:
        """Schedule `key` for the sweep at or after `when`."""
        self._new_keys.append(key)
        self._new_seconds.append(max(math.ceil(when), self._swept + 1))

    def take(self, now: float) -> list[str]:
        """Remove and return the keys scheduled up to `now` (every key when it is +inf)."""
        self._group()
        buckets = self._buckets
        if now == math.inf:
            seconds: range | list[int] = list(buckets)
        else:
            upto = math.floor(now)
            if upto - self._swept <= len(buckets):
                seconds = range(self._swept + 1, upto + 1)
            else:  # a long gap since the last sweep: fewer buckets than seconds
                seconds = [second for second in buckets if second <= upto]
            self._swept = max(self._swept, upto)
        due: list[str] = []
        for second in seconds:
            keys = buckets.pop(second, None)
            if keys:
                due.extend(keys)
        return due

    def _group(self) -> None:
        if not self._new_keys:
            return
        grouped: dict[int, list[str]] = {}
        for second, key in zip(self._new_seconds, self._new_keys, strict=True):
            grouped.setdefault(second, []).append(key)
        self._new_keys.clear()
        del self._new_seconds[:]
        for second, keys in grouped.items():
            self._buckets[second] = self._buckets.get(second, ()) + tuple(keys)

    def clear(self) -> None:
        self._buckets.clear()
        self._new_keys.clear()
        del self._new_seconds[:]
