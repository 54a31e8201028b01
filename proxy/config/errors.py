"""Config errors: every problem names its YAML path, with a did-you-mean for a mistyped key."""

from __future__ import annotations

import difflib
import typing


class ConfigError(Exception):
    """One or more problems with a config file, each prefixed by its YAML path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def format_path(loc: tuple[int | str, ...]) -> str:
    """('routes', 2, 'upstream') -> 'routes[2].upstream'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
