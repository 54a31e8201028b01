"""Reading a config: YAML without duplicate keys, `${VAR}` expansion, validation into `Config`,
and the checks across sections that one model cannot make."""

from __future__ import annotations

import hashlib
import os
import re
import types
import typing
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from proxy.config.env import expand_env
from proxy.config.errors import ConfigError, did_you_mean, format_path
from proxy.config.models import Admin, Config, loopback_only
from proxy.config.models_route import SAFE_METHODS, Route
from proxy.config.store_url import StoreKind

DEFAULT_PATH = "config/proxy.yaml"
_PYDANTIC_STEP = re.compile(r"^[a-z][a-z-]*\[.*\]$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value, not a list or mapping",
                key_node.start_mark,
            )
        if key in mapping:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class whose fields live at `loc`, following dicts, lists and optionals."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap(annotation)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _describe(error: Any) -> str:
    # Drop pydantic's validator steps (`function-after[...]`), keep user keys such as `a[b`.
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and _PYDANTIC_STEP.match(p)))
    if error["type"] == "extra_forbidden":
        key = error["loc"][-1]  # the user's key, whatever it looks like
        parent = loc[:-1] if loc and loc[-1] == key else loc
        model = _model_at(parent)
        hint = did_you_mean(str(key), model.model_fields) if model else ""
        return f"{format_path((*parent, key))}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{format_path(loc)}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{format_path(loc)}: {message}"


def _references(config: Config) -> Iterator[str]:
    seen: set[str] = set()
    for i, route in enumerate(config.routes):
        if route.name in seen:
            yield f"routes[{i}].name: duplicate route name {route.name!r}"
        seen.add(route.name)
        if route.upstream not in config.upstreams:
            hint = did_you_mean(route.upstream, config.upstreams)
            yield f"routes[{i}].upstream: unknown upstream {route.upstream!r}{hint}"
        yield from _unreachable_retries(i, route)
    if config.shutdown.drain_delay >= config.shutdown.timeout:
        yield "shutdown.drain_delay: must be shorter than shutdown.timeout"
    yield from _workers_need_shared_store(config)
    yield from _admin_needs_a_token(config.admin)


def _admin_needs_a_token(admin: Admin) -> Iterator[str]:
    """POST /admin/drain stops the proxy: off loopback, only a token holder may send it."""
    if loopback_only(admin.host) or admin.allow_unauthenticated:
        return
    if admin.token_file is None and admin.token_env is None:
        yield (
            f"admin.host: {admin.host or '(all interfaces)'} is reachable from other machines, so "
            "the admin actions (/admin/*) need a bearer token: set admin.token_file or "
            "admin.token_env, or admin.allow_unauthenticated: true to accept anyone who can "
            "reach the port"
        )


def _workers_need_shared_store(config: Config) -> Iterator[str]:
    """Worker processes share nothing in memory: idempotency records and quota counters kept
    there would be per worker, so a retry on another connection could execute again."""
    if config.workers == 1 or config.store.kind is not StoreKind.MEMORY:
        return
    users = [
        f"routes[{i}].{feature}"
        for i, route in enumerate(config.routes)
        for feature, used in (
            ("idempotency", route.idempotency.enabled),
            ("quota", route.quota is not None),
        )
        if used
    ]
    if users:
        yield (
            f"workers: {config.workers} worker processes require a shared store "
            f"(store.url: redis://...) for {', '.join(users)}; memory:// is per process"
        )


def _unreachable_retries(i: int, route: Route) -> Iterator[str]:
    """Retries beyond not_sent apply to safe methods only; say so when none can match."""
    methods = route.match.methods
    if route.retries is None or methods is None or SAFE_METHODS & set(methods):
        return
    extra = [str(on) for on in route.retries.on if on != "not_sent"]
    if extra:
        yield (
            f"routes[{i}].retries.on: {', '.join(extra)} can only apply to GET, HEAD and OPTIONS, "
            f"and this route matches only {', '.join(methods)}"
        )


def parse(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate already-parsed YAML data; every problem is reported with its path."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of config keys"])
    data = expand_env(data, os.environ if env is None else env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()]) from None
    problems = list(_references(config))
    if problems:
        raise ConfigError(problems)
    return config


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file."""
    return loads(read_text(path), str(path), env)


def loads(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Parse, expand and validate config text; `source` names it in error messages."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    return parse(data, env)


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read config file: {reason}"]) from None


def config_hash(config: Config) -> str:
    """A short stable fingerprint of the effective config, for logs and /health."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
