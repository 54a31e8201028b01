"""First-match route table, compiled once per config: path prefix (segment-aware) and methods.

A prefix tree over path segments: a lookup walks the request path's segments once, so its cost
grows with the depth of the path, never with the number of routes. Each node keeps, per method,
the earliest route (in config order) whose prefix ends there; the lookup keeps the earliest of
those it passes, so a route earlier in the config still wins over a longer prefix later on,
exactly as a scan in config order would.

Paths and prefixes are normal (proxy.http.path): no empty, `.` or `..` segments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Spec(NamedTuple, Generic[T]):
    prefix: str
    methods: Iterable[str] | None
    value: T
    # Compare prefix and path in lower case (for upstreams that ignore the path's case).
    ignore_case: bool = False


# (config index, value): the smaller index wins.
_Candidate = tuple[int, T]


class _Earliest(Generic[T]):
    """The earliest route per method among those ending at one node."""

    __slots__ = ("_any", "_by_method", "_first")

    def __init__(self) -> None:
        self._first: dict[str, _Candidate[T]] = {}
        self._any: _Candidate[T] | None = None
        self._by_method: dict[str, _Candidate[T]] = {}

    def add(self, candidate: _Candidate[T], methods: frozenset[str] | None) -> None:
        if methods is None:
            if self._any is None:
                self._any = candidate
        else:
            for method in methods:
                self._first.setdefault(method, candidate)

    def seal(self) -> None:
        """Fold the any-method route into each method's entry: a lookup is one dict get."""
        self._by_method = {
            method: own if self._any is None or own[0] < self._any[0] else self._any
            for method, own in self._first.items()
        }

    def get(self, method: str) -> _Candidate[T] | None:
        return self._by_method.get(method, self._any)


class _Node(Generic[T]):
    __slots__ = ("children", "deeper", "here")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        # Prefixes ending here ("/v1/pay"): they match this path and everything below it.
        self.here: _Earliest[T] | None = None
        # Prefixes ending here with a slash ("/v1/pay/"): they need one more segment.
        self.deeper: _Earliest[T] | None = None

    def seal(self) -> None:
        for earliest in (self.here, self.deeper):
            if earliest is not None:
                earliest.seal()
        for child in self.children.values():
            child.seal()


class _Tree(Generic[T]):
    __slots__ = ("root",)

    def __init__(self) -> None:
        self.root: _Node[T] = _Node()

    def add(self, prefix: str, candidate: _Candidate[T], methods: frozenset[str] | None) -> None:
        segments = prefix.split("/")[1:]
        slash = segments[-1] == ""
        if slash:
            segments.pop()
        node = self.root
        for segment in segments:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node()
            node = child
        if slash:
            if node.deeper is None:
                node.deeper = _Earliest()
            node.deeper.add(candidate, methods)
        else:
            if node.here is None:
                node.here = _Earliest()
            node.here.add(candidate, methods)

    def lookup(self, path: str, method: str) -> _Candidate[T] | None:
        segments = path.split("/")
        count = len(segments)
        best: _Candidate[T] | None = None
        node = self.root
        i = 1  # segments[0] is the empty string before the leading '/'
        while True:
            if node.here is not None:
                found = node.here.get(method)
                if found is not None and (best is None or found[0] < best[0]):
                    best = found
            if i == count:
                return best
            if node.deeper is not None:
                found = node.deeper.get(method)
                if found is not None and (best is None or found[0] < best[0]):
                    best = found
            child = node.children.get(segments[i])
            if child is None:
                return best
            node = child
            i += 1


class RouteTable(Generic[T]):
    """Routes in config order; `match` returns the first whose prefix and methods fit."""

    __slots__ = ("_exact", "_folded")

    def __init__(self, specs: Iterable[Spec[T]]) -> None:
        self._exact: _Tree[T] = _Tree()
        folded: _Tree[T] = _Tree()
        any_folded = False
        for index, spec in enumerate(specs):
            methods = None if spec.methods is None else frozenset(spec.methods)
            if spec.ignore_case:
                folded.add(spec.prefix.lower(), (index, spec.value), methods)
                any_folded = True
            else:
                self._exact.add(spec.prefix, (index, spec.value), methods)
        self._exact.root.seal()
        folded.root.seal()
        # Most configs have no case-insensitive route: one walk per request then.
        self._folded = folded if any_folded else None

    def match(self, path: str, method: str) -> T | None:
        best = self._exact.lookup(path, method)
        if self._folded is not None:
            other = self._folded.lookup(path.lower(), method)
            if other is not None and (best is None or other[0] < best[0]):
                best = other
        return None if best is None else best[1]
