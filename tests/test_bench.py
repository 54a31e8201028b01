"""Smoke test of the benchmark harness: it starts everything, measures, and reports the figures
(never asserts speed: performance targets live in bench/, not in timed tests); and the targets
table judged from canned figures."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import stage_profile
from bench.__main__ import all_modes, main
from bench.harness import Lab
from bench.targets import BASELINE, TARGETS, Verdict, evaluate, markdown

runs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="the benchmark needs wrk")


@pytest.mark.slow
@runs_wrk
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
    assert [t["target"] for t in report["targets"]] == [t["target"] for t in evaluate(report)]
    assert table.index("| plain |") < table.index("TARGETS")  # after the results table
    assert "| target | measured | pass/miss |" in table


@pytest.mark.slow
@runs_wrk
def test_quick_run_of_two_workers_counts_the_whole_process_tree(tmp_path: Path) -> None:
    assert main(["--quick", "--modes", "direct,idemproxy-w2", "--out", str(tmp_path)]) == 0

    report = orjson.loads(next(tmp_path.glob("bench-*.json")).read_bytes())
    row = next(row for row in report["modes"] if row["mode"] == "idemproxy-w2")
    assert row["rps"] > 0
    assert row["errors"] == 0
    assert row["idle_rss_mib"] > 100  # the supervisor and both workers, not one process


@pytest.mark.slow
@runs_wrk
def test_quick_idle_curve_measures_each_count_with_its_connections_held(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--curves", "idle", "--quick"]) == 0

    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1")]
    assert [row.split("|")[1].strip() for row in rows] == ["100"]
    cells = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert cells[1].endswith(" µs") and float(cells[1].split()[0]) > 0  # CPU per request
    assert cells[-1] == "0"  # errors: no held connection was refused or closed under the load


@pytest.mark.slow
def test_the_instruction_counter_drives_both_planes_to_the_end(tmp_path: Path) -> None:
    """bench.instructions runs its driver under callgrind; here without it, so the driver
    cannot rot unnoticed where valgrind is not installed (it answers every request it sends)."""
    lab = Lab(tmp_path)
    try:
        upstream = lab.upstream(cpu=0)
        for mode in ("idemproxy", "floor"):
            subprocess.run(
                [sys.executable, "-m", "bench.instructions", "--drive", mode, upstream.url, "50"],
                check=True,
                timeout=60,
            )
    finally:
        lab.stop_all()


def test_an_unknown_curve_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--curves", "idle,nope"])
    assert exc.value.code == 2


def _row(mode: str, **figures: float | None) -> dict[str, Any]:
    return {"mode": mode, **figures}


def _report(*rows: dict[str, Any], held: int = 1000) -> dict[str, Any]:
    return {"modes": list(rows), "parameters": {"held_connections": held}}


PASS_THROUGH_ROW = _row(
    "idemproxy",
    rps=8000.0,
    x_plain=1.25,
    x_nginx=0.09,
    p90_added_ms=1.45,
    cores_at_paced=0.165,
    paced_rps=967.0,
    idle_rss_mib=58.7,
    held_rss_mib=69.1,
)


def _verdicts(report: dict[str, Any]) -> list[str]:
    return [t["verdict"] for t in evaluate(report)]


def test_targets_are_judged_from_the_runs_own_figures() -> None:
    report = _report(
        PASS_THROUGH_ROW,
        _row("idem-first-redis", rps=4000.0),  # 0.50x pass-through
        _row("idem-replay-redis", rps=8400.0),  # 1.05x
    )

    judged = evaluate(report)

    assert [(t["shown"], t["verdict"]) for t in judged] == [
        ("1.25x", Verdict.MISS),
        ("0.090x", Verdict.MISS),
        ("1.45 ms", Verdict.MISS),
        ("0.171", Verdict.MISS),  # 0.165 cores at 967 req/s, scaled to 1,000 req/s
        ("0.50x", Verdict.MISS),
        ("1.05x", Verdict.PASS),
        ("58.7 MiB", Verdict.PASS),
        ("69.1 MiB", Verdict.PASS),
    ]
    assert judged[3]["measured"] == pytest.approx(0.165 * 1000 / 967)


def test_a_figure_exactly_at_its_limit_passes_and_just_beyond_it_misses() -> None:
    at_limit = _row(
        "idemproxy",
        rps=1000.0,
        x_plain=2.5,
        x_nginx=0.25,
        p90_added_ms=0.8,
        cores_at_paced=0.1,
        paced_rps=1000.0,
        idle_rss_mib=60.0,
        held_rss_mib=100.0,
    )
    redis = [_row("idem-first-redis", rps=700.0), _row("idem-replay-redis", rps=1000.0)]
    assert set(_verdicts(_report(at_limit, *redis))) == {Verdict.PASS}

    beyond = {
        "x_plain": 2.49,
        "x_nginx": 0.249,
        "p90_added_ms": 0.81,
        "cores_at_paced": 0.101,
        "idle_rss_mib": 60.1,
        "held_rss_mib": 100.1,
    }
    for key, value in beyond.items():
        verdicts = _verdicts(_report({**at_limit, key: value}, *redis))
        assert verdicts.count(Verdict.MISS) == 1, key
    slow_redis = [_row("idem-first-redis", rps=699.0), _row("idem-replay-redis", rps=999.0)]
    assert _verdicts(_report(at_limit, *slow_redis))[4:6] == [Verdict.MISS, Verdict.MISS]


def test_what_the_run_did_not_measure_is_not_measured_never_pass_or_miss() -> None:
    # No nginx installed (no x_nginx), no redis-server (no Redis rows), and `--quick` held only
    # 50 connections, which cannot show the 1,000-connection figure.
    row = {k: v for k, v in PASS_THROUGH_ROW.items() if k != "x_nginx"}

    judged = evaluate(_report(row, held=50))

    unmeasured = [t["target"] for t in judged if t["verdict"] == Verdict.NOT_MEASURED]
    assert len(unmeasured) == 4
    assert all(t["shown"] == "—" and t["measured"] is None for t in judged[4:6])
    assert "nginx" in unmeasured[0]
    assert "1,000 client connections" in unmeasured[-1]
    # With no pass-through row at all (e.g. `--modes direct,plain`) nothing is judged.
    assert set(_verdicts(_report(_row("direct", rps=1.0)))) == {Verdict.NOT_MEASURED}


def test_the_targets_table_has_one_row_per_target_with_its_verdict() -> None:
    judged = evaluate(_report(PASS_THROUGH_ROW, held=0))

    lines = markdown(judged).splitlines()

    assert lines[0] == "TARGETS"
    assert lines[2] == "| target | measured | pass/miss |"
    body = lines[4:]
    assert len(body) == len(TARGETS)
    assert body[0] == "| pass-through throughput vs plain aiohttp proxy ≥ 2.50x | 1.25x | miss |"
    assert body[-1].endswith("| — | not measured |")


def test_a_baseline_build_is_judged_from_its_own_rows_in_the_same_table() -> None:
    # `--baseline`: the older build's rows sit beside the current build's in one run.
    current = [
        {**PASS_THROUGH_ROW, "x_plain": 1.6},
        _row("idem-first-redis", rps=6000.0),
        _row("idem-replay-redis", rps=8800.0),
    ]
    older = [
        {**PASS_THROUGH_ROW, "mode": "baseline", "rps": 5000.0},
        _row("baseline-first-redis", rps=2500.0),
        _row("baseline-replay-redis", rps=4000.0, errors=7),
    ]
    report = _report(*current, *older)

    judged, baseline = evaluate(report), evaluate(report, BASELINE)

    assert [t["shown"] for t in judged][:1] + [t["shown"] for t in judged][4:6] == [
        "1.60x", "0.75x", "1.10x",
    ]
    assert [t["shown"] for t in baseline][4:6] == ["0.50x", "7 errors"]
    assert baseline[5]["verdict"] == Verdict.NOT_MEASURED  # its own errors, not the current's
    lines = markdown(judged, baseline).splitlines()
    assert lines[2] == "| target | measured | pass/miss | baseline (same run) |"
    assert lines[4].endswith("| 1.60x | miss | 1.25x (miss) |")
    assert lines[8].endswith("| 0.75x | pass | 0.50x (miss) |")


def test_the_removed_aiohttp_transport_has_no_benchmark_mode() -> None:
    names = [mode.name for mode in all_modes()]

    assert "idemproxy" in names
    assert not any("aiohttp" in name for name in names)


def test_a_figure_from_a_run_with_failed_requests_is_not_measured() -> None:
    # Round 3 of a full run once filled the memory store: fast 503s inflated the req/s.
    redis = [_row("idem-first-redis", rps=9000.0, errors=120), _row("idem-replay-redis", rps=1.0)]

    judged = evaluate(_report({**PASS_THROUGH_ROW, "errors": 0}, *redis))

    assert judged[4]["verdict"] == Verdict.NOT_MEASURED
    assert judged[4]["shown"] == "120 errors"
    assert judged[5]["verdict"] == Verdict.MISS  # the replay row had no errors
    failing_pass_through = {**PASS_THROUGH_ROW, "errors": 3}
    assert set(_verdicts(_report(failing_pass_through, *redis))) == {Verdict.NOT_MEASURED}


def test_stage_profile_charges_each_sample_to_the_deepest_idemproxy_frame() -> None:
    main_thread = "_run_module_as_main (<frozen runpy>:198);main (proxy/cli.py:131)"
    raw = "\n".join([
        f"{main_thread};Runner.run (asyncio/runners.py:118) 50",
        f"{main_thread};HttpProtocol._handle (proxy/server/protocol.py:249);"
        "DataPlane.__call__ (proxy/pipeline/runtime.py:289);"
        "forward (proxy/pipeline/forward.py:87);send (proxy/upstream/h1.py:124) 30",
        f"{main_thread};HttpProtocol._handle (proxy/server/protocol.py:249);"
        "StreamResponse.write (proxy/http/response.py:140) 15",
        f"{main_thread};record (proxy/observability/access_log.py:214);"
        "iso_time (proxy/observability/events.py:48) 5",
        "Thread._bootstrap (threading.py:1002);LogSink._run (proxy/observability/logsink.py:108) 99",
    ])
    assert stage_profile.attribute(raw) == {
        stage_profile.LOOP: 50,
        "upstream client (h1 pool)": 30,
        "server: llhttp parse, heads, socket writes": 15,
        "access log and metrics": 5,
    }  # the log writer thread is off the request's path


def test_records_curve_in_process_prints_a_row_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    """`--curves` reaches the records curve with its own options; the in-process mode needs no
    wrk. Its figures are printed, not judged here."""
    assert main(["--curves", "records", "--in-process", "--sizes", "0,2000"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["0", "2,000"]
    assert rows[2].count(" B ") == 2  # RSS per record and the part beyond headers and body
