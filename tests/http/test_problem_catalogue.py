"""The problem catalogue is the one list of what the proxy answers: the docs table must match it,
and no slug may be written anywhere else in the code."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.http.problem import ProblemType, retry_after

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (\d{3}) \| (`[a-z-]+`(?:, `[a-z-]+`)*) \|", re.M)


def documented() -> set[tuple[int, str]]:
    text = (REPO / "docs" / "http.md").read_text(encoding="utf-8")
    return {
        (int(status), slug)
        for status, slugs in ROW.findall(text)
        for slug in re.findall(r"`([a-z-]+)`", slugs)
    }


def test_the_docs_table_lists_exactly_the_catalogue() -> None:
    catalogue = {(kind.status, kind.slug) for kind in ProblemType}
    assert documented() == catalogue


def test_slugs_and_titles_are_unique() -> None:
    assert len({kind.slug for kind in ProblemType}) == len(ProblemType)
    assert len({kind.title for kind in ProblemType}) == len(ProblemType)


def test_no_slug_is_written_outside_the_catalogue() -> None:
    slugs = {kind.slug for kind in ProblemType}
    catalogue = REPO / "proxy" / "http" / "problem.py"
    quoted = re.compile(r"[\"']([a-z]+(?:-[a-z]+)+)[\"']")
    offenders = [
        f"{path.relative_to(REPO)}: {slug}"
        for path in (REPO / "proxy").rglob("*.py")
        if path != catalogue
        for slug in quoted.findall(path.read_text(encoding="utf-8"))
        if slug in slugs
    ]
    assert offenders == []


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    assert [retry_after(s)[1] for s in (0.0, 0.2, 1.0, 1.01, 29.5)] == ["1", "1", "1", "2", "30"]
