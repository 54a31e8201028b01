"""`python -m bench.multiproc_cost`: what one request's metrics cost in idemproxy's plain cells
(proxy/observability/instruments.py) against prometheus-client's multiprocess mode
(memory-mapped values), the
alternative for `workers: N`. One request = one counter increment + one histogram observation.
"""

from __future__ import annotations

import os
import sys
import tempfile
import timeit
from collections.abc import Callable

from proxy.config import parse
from proxy.observability.metrics import Metrics

ROUNDS = 200_000
CONFIG = parse(
    {
        "upstreams": {"app": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "api", "upstream": "app"}],
    },
    env={},
)


def cells() -> Callable[[], None]:
    metrics = Metrics()
    metrics.compile(CONFIG)
    api = metrics.route("api")
    return lambda: api.request("GET", 200, 0.004)


def multiprocess() -> Callable[[], None]:
    """Set up in a scratch PROMETHEUS_MULTIPROC_DIR before prometheus_client picks its values."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="idemproxy-multiproc-")
    from prometheus_client import CollectorRegistry, Counter, Histogram, values

    values.ValueClass = values.get_value_class()  # re-read the environment
    registry = CollectorRegistry()
    requests = Counter(
        "requests", "", ["route", "method", "status_class"], registry=registry
    ).labels("api", "GET", "2xx")
    duration = Histogram("duration", "", ["route"], registry=registry).labels("api")

    def request() -> None:
        requests.inc()
        duration.observe(0.004)

    return request


def per_call_ns(call: Callable[[], None]) -> float:
    return min(timeit.repeat(call, number=ROUNDS, repeat=5)) / ROUNDS * 1e9


def main() -> int:
    plain = per_call_ns(cells())
    mapped = per_call_ns(multiprocess())
    print(f"per request: plain cells {plain:.0f} ns, multiprocess mode {mapped:.0f} ns "
          f"({mapped / plain:.1f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
