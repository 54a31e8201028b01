"""The instruments the request path bumps: plain cells and histograms, held per route and per
upstream target, so a request costs a dict lookup and a few additions (no lock, no `.labels()`).

The registry that owns them and turns them into metric families when scraped is
proxy/observability/metrics.py.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING

from proxy.http.context import Decision, IdempotencyOutcome
from proxy.observability.answers import STATUS_OUTCOMES, ProxyReason, TargetOutcome

if TYPE_CHECKING:
    from proxy.observability.metrics import Metrics

# OpenTelemetry's advisory buckets for http.server.request.duration, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_BUCKET_LABELS = [*(repr(b) for b in BUCKETS), "+Inf"]
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
OTHER_METHOD = "_OTHER"
OUTCOMES = tuple(IdempotencyOutcome)


class Cell:
    """One counter or gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Histogram:
    """One histogram series: per-bucket counts (made cumulative when scraped) and the sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        out: list[tuple[str, float]] = []
        for label, count in zip(_BUCKET_LABELS, list(self.buckets), strict=True):
            total += count
            out.append((label, total))
        return out


class RouteMetrics:
    """The series of one route, so a request costs a dict lookup and a few additions."""

    __slots__ = (
        "_decisions",
        "_idempotency",
        "_metrics",
        "_proxy",
        "_requests",
        "duration",
        "name",
    )

    def __init__(self, metrics: Metrics, name: str, methods: Iterable[str], idempotent: bool):
        self.name = name
        self._metrics = metrics
        self._requests: dict[tuple[str, int], Cell] = {}
        self._idempotency: dict[str, Cell] = {}
        # Created up front so that the first answer of a kind is an increase from 0.
        self._proxy = {
            reason: metrics.proxy_responses.setdefault((name, reason), Cell())
            for reason in ProxyReason
        }
        self._decisions: dict[Decision, Cell] = {}
        self.duration = metrics.request_duration.setdefault(name, Histogram())
        for method in methods:
            for status_class in range(2, 6):
                self._request_cell(method, status_class)
        if idempotent:
            for outcome in OUTCOMES:
                self._idempotency_cell(outcome)
            for decision in Decision:
                self._decision_cell(decision)

    def request(self, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = OTHER_METHOD
        key = (method, status // 100)
        cell = self._requests.get(key)
        if cell is None:
            cell = self._request_cell(method, key[1])
        cell.value += 1
        self.duration.observe(seconds)

    def proxy_response(self, reason: ProxyReason) -> None:
        self._proxy[reason].value += 1

    def idempotency(self, outcome: str) -> None:
        cell = self._idempotency.get(outcome)
        if cell is None:
            if outcome not in OUTCOMES:
                return
            cell = self._idempotency_cell(outcome)
        cell.value += 1

    def decision(self, decision: Decision) -> None:
        cell = self._decisions.get(decision)
        if cell is None:
            cell = self._decision_cell(decision)
        cell.value += 1

    def _decision_cell(self, decision: Decision) -> Cell:
        cell = self._decisions[decision] = self._metrics.decisions.setdefault(
            (self.name, decision), Cell()
        )
        return cell

    def _request_cell(self, method: str, status_class: int) -> Cell:
        key = (self.name, method, f"{status_class}xx")
        cell = self._requests[(method, status_class)] = self._metrics.requests.setdefault(
            key, Cell()
        )
        return cell

    def _idempotency_cell(self, outcome: str) -> Cell:
        cell = self._idempotency[outcome] = self._metrics.idempotency.setdefault(
            (self.name, outcome), Cell()
        )
        return cell


class TargetMetrics:
    """The series of one upstream target (per attempt: a retried request counts each try)."""

    __slots__ = ("_outcomes", "duration", "inflight")

    def __init__(self, metrics: Metrics, upstream: str, target: str) -> None:
        key = (upstream, target)
        self.duration = metrics.target_duration.setdefault(key, Histogram())
        self.inflight = metrics.target_inflight.setdefault(key, Cell())
        self._outcomes = {
            outcome: metrics.target_requests.setdefault((upstream, target, outcome), Cell())
            for outcome in TargetOutcome
        }

    def answered(self, status: int, seconds: float) -> None:
        outcome = STATUS_OUTCOMES.get(status // 100)
        if outcome is not None:
            self._outcomes[outcome].value += 1
        self.duration.observe(seconds)

    def failed(self, sent: bool, seconds: float) -> None:
        outcome = TargetOutcome.AMBIGUOUS if sent else TargetOutcome.NOT_SENT
        self._outcomes[outcome].value += 1
        self.duration.observe(seconds)

