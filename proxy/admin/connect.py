"""`idemproxy check --connect`: one probe of the store and of every upstream target."""

from __future__ import annotations

import aiohttp

from proxy.admin.checks import Observation, StoreHealth, probe_http, probe_store
from proxy.config import Config


async def connect_report(config: Config, store: StoreHealth) -> tuple[bool, list[str]]:
    """`idemproxy check --connect`: one probe of the store and of every upstream target (its
    health path when configured, else any HTTP answer on `/`). False if anything failed."""
    lines: list[str] = []
    ping, policy = await probe_store(store, config.health.store_timeout)
    results = [ping]
    lines.append(_describe(f"store {config.store.url.split(':', 1)[0]}", ping))
    if policy is not None:
        lines.append(_describe("store eviction policy", policy))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for name, upstream in config.upstreams.items():
            check = upstream.health
            for url in upstream.target_urls:
                if check is not None:
                    seen = await probe_http(session, url + check.path, check.timeout)
                else:
                    seen = await probe_http(session, url + "/", upstream.connect_timeout, True)
                results.append(seen)
                lines.append(_describe(f"upstream {name} {seen.component_id}", seen))
    return all(r.status == "pass" for r in results), lines


def _describe(label: str, seen: Observation) -> str:
    shown = "" if seen.value is None else f" {seen.value}" + (f" {seen.unit}" if seen.unit else "")
    return f"{label}: {seen.status}{shown}" + (f" ({seen.output})" if seen.output else "")
