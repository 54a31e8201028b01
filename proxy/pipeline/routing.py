"""First-match route table, compiled once per config: path prefix (segment-aware) and methods."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    prefix: str
    methods: frozenset[str] | None
    value: T

    def matches(self, path: str, method: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        # "/v1/pay" matches "/v1/pay" and "/v1/pay/x", not "/v1/payments".
        return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/?"


class RouteTable(Generic[T]):
    """Routes in config order; `match` returns the first whose prefix and methods fit."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[tuple[str, Iterable[str] | None, T]]) -> None:
        self._entries = tuple(
            _Entry(prefix, None if methods is None else frozenset(methods), value)
            for prefix, methods, value in entries
        )

    def match(self, path: str, method: str) -> T | None:
        for entry in self._entries:
            if entry.matches(path, method):
                return entry.value
        return None
