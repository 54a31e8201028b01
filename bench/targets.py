"""The performance targets (issue 18) judged from one run's own figures: pass, miss or not
measured, never against figures from another run or another machine.

A run can measure two builds side by side (`--baseline`): the same targets are judged for each
from its own rows (`Subject`), so the baseline column is a same-machine, same-hour comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PASS_THROUGH = "idemproxy"
HELD_CONNECTIONS = 1000  # the connection count the held-RSS target is stated for

Rows = dict[str, dict[str, Any]]


class Verdict(StrEnum):
    PASS = "pass"
    MISS = "miss"
    NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Subject:
    """The rows one build's figures are read from."""

    pass_through: str
    first: str  # POST with a fresh key on the Redis store
    replay: str  # POST with a fixed key on the Redis store


CURRENT = Subject(PASS_THROUGH, "idem-first-redis", "idem-replay-redis")
BASELINE = Subject("baseline", "baseline-first-redis", "baseline-replay-redis")

# A figure from the rows by mode name, the run's parameters and the build; None: not measured.
Figure = Callable[[Rows, dict[str, Any], Subject], float | None]


@dataclass(frozen=True)
class Target:
    title: str
    limit: float
    at_least: bool  # True: the figure must reach `limit`; False: it must stay at or below it
    fmt: str  # format of the figure and the limit, e.g. "{:.2f}x"
    # The rows the figure is read from: the build's own (Subject field names) and references.
    reads: tuple[str, ...]
    figure: Figure

    def judge(self, value: float | None) -> Verdict:
        if value is None:
            return Verdict.NOT_MEASURED
        met = value >= self.limit if self.at_least else value <= self.limit
        return Verdict.PASS if met else Verdict.MISS

    def modes(self, subject: Subject) -> list[str]:
        return [getattr(subject, name, name) for name in self.reads]


def _field(key: str) -> Figure:
    def figure(rows: Rows, _params: dict[str, Any], subject: Subject) -> Any:
        return rows.get(subject.pass_through, {}).get(key)

    return figure


def _vs_pass_through(which: str) -> Figure:
    def figure(rows: Rows, _params: dict[str, Any], subject: Subject) -> Any:
        mode = getattr(subject, which)
        if mode not in rows or not rows.get(subject.pass_through, {}).get("rps"):
            return None
        return rows[mode]["rps"] / rows[subject.pass_through]["rps"]

    return figure


def _cores_per_1k(rows: Rows, _params: dict[str, Any], subject: Subject) -> float | None:
    """Cores in the paced run scaled to exactly 1,000 req/s: the pacing lands at 950-990."""
    row = rows.get(subject.pass_through)
    if row is None or not row.get("paced_rps"):
        return None
    return float(row["cores_at_paced"]) * 1000 / float(row["paced_rps"])


def _held_rss(rows: Rows, params: dict[str, Any], subject: Subject) -> float | None:
    # Fewer held connections (`--quick`, `--hold 50`) cannot show the 1,000-connection figure.
    if params.get("held_connections", 0) < HELD_CONNECTIONS:
        return None
    value = rows.get(subject.pass_through, {}).get("held_rss_mib")
    return None if value is None else float(value)


_PT = ("pass_through",)
TARGETS = (
    Target("pass-through throughput vs plain aiohttp proxy", 2.5, True, "{:.2f}x",
           (*_PT, "plain"), _field("x_plain")),
    # Three places: at about a tenth, two would hide a 5 % change between builds.
    Target("pass-through throughput vs nginx proxy_pass (1 worker)", 0.25, True, "{:.3f}x",
           (*_PT, "nginx"), _field("x_nginx")),
    Target("latency added at ~1,000 req/s, p90", 0.8, False, "{:.2f} ms",
           (*_PT, "direct"), _field("p90_added_ms")),
    Target("cores used per 1,000 req/s (paced run)", 0.10, False, "{:.3f}", _PT, _cores_per_1k),
    Target("Redis first execution vs pass-through", 0.7, True, "{:.2f}x",
           (*_PT, "first"), _vs_pass_through("first")),
    Target("Redis replay vs pass-through", 1.0, True, "{:.2f}x",
           (*_PT, "replay"), _vs_pass_through("replay")),
    Target("RSS idle", 60, False, "{:.1f} MiB", _PT, _field("idle_rss_mib")),
    Target(f"RSS with {HELD_CONNECTIONS:,} client connections", 100, False, "{:.1f} MiB",
           _PT, _held_rss),
)  # fmt: skip


def evaluate(report: dict[str, Any], subject: Subject = CURRENT) -> list[dict[str, Any]]:
    """One row per target: its title, the limit, the figure measured (or None) and the verdict."""
    rows = {row["mode"]: row for row in report["modes"]}
    params = report["parameters"]
    judged = []
    for target in TARGETS:
        # Failed requests (a 503 is fast) would flatter the figure: it is not a measurement.
        errors = sum(rows[mode].get("errors", 0) for mode in target.modes(subject) if mode in rows)
        value = None if errors else target.figure(rows, params, subject)
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


def markdown(judged: list[dict[str, Any]], baseline: list[dict[str, Any]] | None = None) -> str:
    """The TARGETS table; with `baseline` (the same targets judged for the baseline build of the
    same run) a column shows its figure and verdict too."""
    lines = ["TARGETS", ""]
    if baseline is None:
        lines += ["| target | measured | pass/miss |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {t['shown']} | {t['verdict']} |" for t in judged]
    else:
        lines += ["| target | measured | pass/miss | baseline (same run) |", "|---|---:|---|---:|"]
        lines += [
            f"| {t['target']} | {t['shown']} | {t['verdict']} | {b['shown']} ({b['verdict']}) |"
            for t, b in zip(judged, baseline, strict=True)
        ]
    return "\n".join(lines) + "\n"
