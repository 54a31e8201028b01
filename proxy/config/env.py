"""`${VAR}` and `${VAR:-default}` in config string values, expanded before validation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from proxy.config.errors import ConfigError, format_path

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, env: Mapping[str, str], loc: tuple[int | str, ...] = ()) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string value, naming the path on failure."""
    if isinstance(data, str):
        def substitute(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError([f"{format_path(loc)}: environment variable {name} is not set"])

        return _ENV_RE.sub(substitute, data)
    if isinstance(data, dict):
        return {k: expand_env(v, env, (*loc, str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, env, (*loc, i)) for i, v in enumerate(data)]
    return data
