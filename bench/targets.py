"""The performance targets (issue 18) judged from one run's own figures: pass, miss or not
measured, never against figures from another run or another machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PASS_THROUGH = "idemproxy"
HELD_CONNECTIONS = 1000  # the connection count the held-RSS target is stated for


class Verdict(StrEnum):
    PASS = "pass"
    MISS = "miss"
    NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Target:
    title: str
    limit: float
    at_least: bool  # True: the figure must reach `limit`; False: it must stay at or below it
    fmt: str  # format of the figure and the limit, e.g. "{:.2f}x"
    modes: tuple[str, ...]  # the rows the figure is read from
    # The figure from the rows by mode name and the run's parameters; None: not measured.
    figure: Callable[[dict[str, dict[str, Any]], dict[str, Any]], float | None]

    def judge(self, value: float | None) -> Verdict:
        if value is None:
            return Verdict.NOT_MEASURED
        met = value >= self.limit if self.at_least else value <= self.limit
        return Verdict.PASS if met else Verdict.MISS


def _field(mode: str, key: str) -> Callable[[dict[str, dict[str, Any]], dict[str, Any]], Any]:
    def figure(rows: dict[str, dict[str, Any]], _params: dict[str, Any]) -> Any:
        return rows.get(mode, {}).get(key)

    return figure


def _vs_pass_through(mode: str) -> Callable[[dict[str, dict[str, Any]], dict[str, Any]], Any]:
    def figure(rows: dict[str, dict[str, Any]], _params: dict[str, Any]) -> Any:
        if mode not in rows or not rows.get(PASS_THROUGH, {}).get("rps"):
            return None
        return rows[mode]["rps"] / rows[PASS_THROUGH]["rps"]

    return figure


def _cores_per_1k(rows: dict[str, dict[str, Any]], _params: dict[str, Any]) -> float | None:
    """Cores in the paced run scaled to exactly 1,000 req/s: the pacing lands at 950-990."""
    row = rows.get(PASS_THROUGH)
    if row is None or not row.get("paced_rps"):
        return None
    return float(row["cores_at_paced"]) * 1000 / float(row["paced_rps"])


def _held_rss(rows: dict[str, dict[str, Any]], params: dict[str, Any]) -> float | None:
    # Fewer held connections (`--quick`, `--hold 50`) cannot show the 1,000-connection figure.
    if params.get("held_connections", 0) < HELD_CONNECTIONS:
        return None
    value = rows.get(PASS_THROUGH, {}).get("held_rss_mib")
    return None if value is None else float(value)


_PT, _FIRST, _REPLAY = (PASS_THROUGH,), "idem-first-redis", "idem-replay-redis"
TARGETS = (
    Target("pass-through throughput vs plain aiohttp proxy", 2.5, True, "{:.2f}x",
           (PASS_THROUGH, "plain"), _field(PASS_THROUGH, "x_plain")),
    Target("pass-through throughput vs nginx proxy_pass (1 worker)", 0.25, True, "{:.2f}x",
           (PASS_THROUGH, "nginx"), _field(PASS_THROUGH, "x_nginx")),
    Target("latency added at ~1,000 req/s, p90", 0.8, False, "{:.2f} ms",
           (PASS_THROUGH, "direct"), _field(PASS_THROUGH, "p90_added_ms")),
    Target("cores used per 1,000 req/s (paced run)", 0.10, False, "{:.3f}", _PT, _cores_per_1k),
    Target("Redis first execution vs pass-through", 0.7, True, "{:.2f}x",
           (*_PT, _FIRST), _vs_pass_through(_FIRST)),
    Target("Redis replay vs pass-through", 1.0, True, "{:.2f}x",
           (*_PT, _REPLAY), _vs_pass_through(_REPLAY)),
    Target("RSS idle", 60, False, "{:.1f} MiB", _PT, _field(PASS_THROUGH, "idle_rss_mib")),
    Target(f"RSS with {HELD_CONNECTIONS:,} client connections", 100, False, "{:.1f} MiB",
           _PT, _held_rss),
)  # fmt: skip


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: its title, the limit, the figure measured (or None) and the verdict."""
    rows = {row["mode"]: row for row in report["modes"]}
    params = report["parameters"]
    judged = []
    for target in TARGETS:
        # Failed requests (a 503 is fast) would flatter the figure: it is not a measurement.
        errors = sum(rows[mode].get("errors", 0) for mode in target.modes if mode in rows)
        value = None if errors else target.figure(rows, params)
        value = None if value is None else float(value)
        comparison = "≥" if target.at_least else "≤"
        shown = f"{errors:,} errors" if errors else "—"
        judged.append(
            {
                "target": f"{target.title} {comparison} {target.fmt.format(target.limit)}",
                "measured": value,
                "shown": shown if value is None else target.fmt.format(value),
                "verdict": target.judge(value).value,
            }
        )
    return judged


def markdown(judged: list[dict[str, Any]]) -> str:
    lines = ["TARGETS", "", "| target | measured | pass/miss |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['shown']} | {t['verdict']} |" for t in judged]
    return "\n".join(lines) + "\n"
