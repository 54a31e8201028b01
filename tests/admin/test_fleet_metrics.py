"""Summing the workers' expositions (the supervisor's /metrics, proxy/admin/fleet_metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.fleet_metrics import FleetMetrics
from proxy.config import parse
from proxy.observability.metrics import Metrics

CONFIG = parse(
    {
        "upstreams": {"app": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "api", "upstream": "app", "match": {"methods": ["GET"]}}],
    },
    env={},
)


def worker_text(requests: int, inflight: int, up: bool, seconds: float = 0.02) -> str:
    metrics = Metrics()
    metrics.compile(CONFIG)
    for _ in range(requests):
        metrics.route("api").request("GET", 200, seconds)
    metrics.inflight.value = inflight
    metrics.upstream_up = lambda: {"app": up}
    return generate_latest(metrics.registry).decode()


def samples(fleet: FleetMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            return fleet.merged()

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


GET_2XX = ("idemproxy_requests_total", (("method", "GET"), ("route", "api"), ("status_class", "2xx")))
BUCKET_25MS = ("idemproxy_request_duration_seconds_bucket", (("le", "0.025"), ("route", "api")))


def test_counters_histograms_and_amount_gauges_add_up_state_gauges_stay_per_worker() -> None:
    fleet = FleetMetrics()
    fleet.observed(0, worker_text(requests=3, inflight=1, up=True))
    fleet.observed(1, worker_text(requests=4, inflight=2, up=False))
    seen = samples(fleet)
    assert seen[GET_2XX] == 7
    assert seen[BUCKET_25MS] == 7
    assert seen[("idemproxy_request_duration_seconds_count", (("route", "api"),))] == 7
    assert seen[("idemproxy_inflight_requests", (("upstream", ""),))] == 3
    assert seen[("idemproxy_upstream_up", (("upstream", "app"), ("worker", "0")))] == 1
    assert seen[("idemproxy_upstream_up", (("upstream", "app"), ("worker", "1")))] == 0


def test_an_exited_workers_counts_stay_in_the_sums_but_not_its_gauges() -> None:
    fleet = FleetMetrics()
    fleet.observed(0, worker_text(requests=3, inflight=1, up=True))
    fleet.observed(1, worker_text(requests=4, inflight=2, up=True))
    fleet.retire(0)
    fleet.observed(0, worker_text(requests=1, inflight=0, up=True))  # the restarted process
    seen = samples(fleet)
    assert seen[GET_2XX] == 8  # never below the 7 reported before the restart
    assert seen[("idemproxy_inflight_requests", (("upstream", ""),))] == 2


def test_process_metrics_add_up_but_start_time_fd_limit_and_build_info_do_not() -> None:
    def worker(rss: float, fds: float, started: float) -> str:
        return (
            "# TYPE process_resident_memory_bytes gauge\n"
            f"process_resident_memory_bytes {rss}\n"
            "# TYPE process_open_fds gauge\n"
            f"process_open_fds {fds}\n"
            "# TYPE process_max_fds gauge\n"
            "process_max_fds 1024\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {started}\n"
            "# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total 2.5\n"
            "# TYPE idemproxy_build_info gauge\n"
            'idemproxy_build_info{version="1.0",python="3.11.2"} 1\n'
        )

    fleet = FleetMetrics()
    fleet.observed(0, worker(100e6, 20, 1000.0))
    fleet.observed(1, worker(50e6, 12, 900.0))
    fleet.observed(2, worker(70e6, 15, 1100.0))
    fleet.retire(2)  # its CPU seconds stay in the sum; its memory and fds are gone
    seen = samples(fleet)
    assert seen[("process_resident_memory_bytes", ())] == 150e6
    assert seen[("process_open_fds", ())] == 32
    assert seen[("process_max_fds", ())] == 1024
    assert seen[("process_start_time_seconds", ())] == 900.0
    assert seen[("process_cpu_seconds_total", ())] == 7.5
    assert seen[("idemproxy_build_info", (("python", "3.11.2"), ("version", "1.0")))] == 1
