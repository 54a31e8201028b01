"""Smoke test of the benchmark harness: it starts everything, measures, and reports the figures
(never asserts speed: performance targets live in bench/, not in timed tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from bench.__main__ import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="the benchmark needs wrk"),
]


def test_quick_run_reports_every_mode_with_ratios(tmp_path: Path) -> None:
    assert main(["--quick", "--modes", "direct,plain", "--out", str(tmp_path)]) == 0

    report = orjson.loads(next(tmp_path.glob("bench-*.json")).read_bytes())
    assert {"date", "command", "machine", "parameters", "modes", "skipped"} <= report.keys()
    rows = {row["mode"]: row for row in report["modes"]}
    assert set(rows) == {"direct", "plain"}
    for row in rows.values():
        assert row["rps"] > 0
        assert row["errors"] == 0
        assert row["peak_rss_mib"] >= row["idle_rss_mib"] > 0
        for key in (
            "p50_added_ms",
            "p90_added_ms",
            "p99_added_ms",
            "cpu_s_per_1k",
            "x_plain",
            "rps_per_core",
        ):
            assert isinstance(row[key], float)
    assert rows["plain"]["held_rss_mib"] > 0  # measured with client connections held open
    assert rows["direct"]["x_direct"] == 1.0
    assert rows["direct"]["p50_added_ms"] == 0.0
    table = next(tmp_path.glob("bench-*.md")).read_text()
    assert "| direct |" in table
    assert "| plain |" in table


def test_quick_run_of_two_workers_counts_the_whole_process_tree(tmp_path: Path) -> None:
    assert main(["--quick", "--modes", "direct,idemproxy-w2", "--out", str(tmp_path)]) == 0

    report = orjson.loads(next(tmp_path.glob("bench-*.json")).read_bytes())
    row = next(row for row in report["modes"] if row["mode"] == "idemproxy-w2")
    assert row["rps"] > 0
    assert row["errors"] == 0
    assert row["idle_rss_mib"] > 100  # the supervisor and both workers, not one process
