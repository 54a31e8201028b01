"""One /metrics for a supervisor's workers: each worker's exposition, parsed and summed.

Workers keep their plain in-process counters (proxy/observability/instruments.py: nothing is
added to the request path); the supervisor scrapes every worker's private admin socket when it
is scraped itself.
Counters and histograms add up across workers, and so do gauges of amounts (requests in
progress). Gauges that describe a state (`PER_WORKER_GAUGES`) cannot be added: they keep one
series per worker, with a `worker` label; a few (`_COMBINE`: start time, fd limit, build info)
keep the min or max. The process_* collectors of each worker are summed the same way (memory,
CPU seconds, open fds of the whole fleet). What an exited worker had counted is kept, so a sum
never goes down when a worker is restarted (Prometheus would read that as a counter reset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PER_WORKER_GAUGES = frozenset({"idemproxy_upstream_up", "idemproxy_circuit_state"})
# Gauges that a sum would misstate: the fleet started when its oldest worker did, and every
# worker has the same fd limit and build, so those keep one value (not N times it).
# Memory, open fds and CPU seconds are amounts and add up like everything else.
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "process_start_time_seconds": min,
    "process_max_fds": min,
    "idemproxy_build_info": max,
    "python_info": max,
}
# Types whose values only grow, so an exited worker's last values stay in the sum.
_CUMULATIVE = frozenset({"counter", "histogram"})

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]  # (sample name, sorted label pairs)


@dataclass
class Family:
    name: str
    documentation: str
    type: str
    samples: dict[SeriesKey, float] = field(default_factory=dict)


def parse(text: str) -> dict[str, Family]:
    """Prometheus text format -> families by name, each sample keyed by name and labels."""
    families: dict[str, Family] = {}
    for metric in text_string_to_metric_families(text):
        family = families[metric.name] = Family(metric.name, metric.documentation, metric.type)
        for sample in metric.samples:
            family.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families


class FleetMetrics:
    """The last exposition seen from each worker, and what exited workers had counted."""

    def __init__(self) -> None:
        self.last: dict[int, dict[str, Family]] = {}
        self.retired: dict[str, Family] = {}

    def observed(self, worker: int, text: str) -> None:
        self.last[worker] = parse(text)

    def retire(self, worker: int) -> None:
        """The worker's process exited: keep its counters and histograms in the sums."""
        for family in self.last.pop(worker, {}).values():
            if family.type in _CUMULATIVE:
                _add(self.retired, family, None)

    def merged(self) -> list[Metric]:
        """Every worker's latest series summed (state gauges per worker), as metric families."""
        out: dict[str, Family] = {}
        for worker, families in sorted(self.last.items()):
            for family in families.values():
                _add(out, family, worker if family.name in PER_WORKER_GAUGES else None)
        for family in self.retired.values():
            _add(out, family, None)
        return list(_metrics(out.values()))


def _add(into: dict[str, Family], family: Family, worker: int | None) -> None:
    target = into.get(family.name)
    if target is None:
        target = into[family.name] = Family(family.name, family.documentation, family.type)
    combine = _COMBINE.get(family.name)
    for (name, labels), value in family.samples.items():
        if worker is not None:
            labels = tuple(sorted((*labels, ("worker", str(worker)))))
        key = (name, labels)
        before = target.samples.get(key)
        if before is None:
            target.samples[key] = value
        else:
            target.samples[key] = combine(before, value) if combine else before + value


def _metrics(families: Iterable[Family]) -> Iterator[Metric]:
    for family in families:
        metric = Metric(family.name, family.documentation, family.type)
        for (name, labels), value in family.samples.items():
            metric.add_sample(name, dict(labels), value)
        yield metric
