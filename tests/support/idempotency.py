"""Config for an idempotent route `/v1` (name `payments`) in front of a test upstream."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse

from tests.support.proxy_process import base_config


def idem_config(
    upstream_url: str,
    store_url: str,
    *,
    store: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    **idempotency: Any,
) -> dict[str, Any]:
    config = base_config(
        upstream_url,
        store={"url": store_url, **(store or {})},
        routes=[
            {
                "name": "payments",
                "match": {"path_prefix": "/v1"},
                "upstream": "app",
                "idempotency": {"enabled": True, **idempotency},
            },
            {"name": "default", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
    )
    config["upstreams"]["app"].update(upstream or {})
    return config


async def assert_problem(response: ClientResponse, status: int, slug: str) -> dict[str, Any]:
    """Assert a problem+json answer of this status and type slug; return its body."""
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json(content_type="application/problem+json")
    assert body["type"] == f"urn:idemproxy:problem:{slug}"
    assert body["status"] == status
    return body
