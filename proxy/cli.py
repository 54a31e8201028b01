"""Command line: `idemproxy run | check | version`, exit codes, and the event loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import yaml

from proxy import __version__
from proxy.admin import auth
from proxy.admin.connect import connect_report
from proxy.config import DEFAULT_PATH, Config, ConfigError, load
from proxy.config.urls import redact_url
from proxy.server import serve as server
from proxy.server import supervisor
from proxy.server.worker_role import WorkerRole
from proxy.stores import open_store

T = TypeVar("T")

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idemproxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "serve with the given config"),
        ("check", "validate the config, print it with every default resolved, and exit"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--config",
            default=None,
            help=f"config file (default: $IDEMPROXY_CONFIG, then {DEFAULT_PATH})",
        )
        if name == "check":
            command.add_argument(
                "--connect",
                action="store_true",
                help="also probe the store and every upstream target (exit 3 if one fails)",
            )
    commands.add_parser("version", help="print the version")
    return parser


def config_path(arg: str | None) -> str:
    return arg or os.environ.get("IDEMPROXY_CONFIG") or DEFAULT_PATH


def route_table(config: Config) -> str:
    rows = [("ROUTE", "MATCH", "METHODS", "UPSTREAM", "IDEMPOTENCY")]
    for route in config.routes:
        policy = route.idempotency
        if policy.enabled:
            scope = f"scope={policy.scope.header}" if policy.scope else "no scope"
            idem = (
                f"{','.join(policy.methods)} {'required' if policy.required else 'optional'} "
                f"{scope}"
            )
        else:
            idem = "off"
        methods = ",".join(route.match.methods) if route.match.methods else "*"
        rows.append((route.name, route.match.path_prefix, methods, route.upstream, idem))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data, with URL credentials, the hash salt and span export
    headers masked."""
    data = config.model_dump(mode="json")
    data["store"]["url"] = redact_url(data["store"]["url"])
    for upstream in data["upstreams"].values():
        if upstream["url"] is not None:
            upstream["url"] = redact_url(upstream["url"])
        for target in upstream["targets"] or ():
            target["url"] = redact_url(target["url"])
    if data["logging"]["hash_salt"]:
        data["logging"]["hash_salt"] = "***"
    export = data["tracing"]["export"]
    if export and export["headers"]:  # collector credentials (Authorization, API keys)
        export["headers"] = dict.fromkeys(export["headers"], "***")
    return data


def check(config: Config) -> str:
    effective = yaml.safe_dump(redacted(config), sort_keys=False)
    return f"{effective}\n{route_table(config)}\n"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.command == "version":
        print(f"idemproxy {__version__}")
        return EXIT_OK
    path = config_path(args.config)
    role = WorkerRole.from_environment()
    token: str | None = None
    try:
        config = load(path)
        # The token is a secret of the running process (`check` validates only the config);
        # a worker serves its admin app on a private socket: its supervisor holds the token.
        if args.command == "run" and role is None:
            token = auth.load_token(config.admin)
    except ConfigError as exc:
        print(f"idemproxy: invalid config {path}:", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        sys.stdout.write(check(config))
        if args.connect:
            reachable, lines = asyncio.run(_connect(config))
            sys.stdout.write("\n" + "\n".join(lines) + "\n")
            return EXIT_OK if reachable else EXIT_UNREACHABLE
        return EXIT_OK
    if role is None and config.workers > 1:
        return run(supervisor.supervise(config, path, token))
    run(server.serve(config, path, role, token))
    return EXIT_OK


async def _connect(config: Config) -> tuple[bool, list[str]]:
    store = open_store(config.store)
    try:
        return await connect_report(config, store)
    finally:
        await store.close()


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # Windows: the default loop
        return asyncio.run(main)
    return uvloop.run(main)
