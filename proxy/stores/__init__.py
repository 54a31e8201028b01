"""Idempotency record stores: `open_store(config.store)` picks memory or Redis from the URL."""

from __future__ import annotations

from proxy.config import Store as StoreConfig
from proxy.config import StoreKind
from proxy.stores.base import Store, StoreError, StoreTimeout
from proxy.stores.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "StoreError", "StoreTimeout", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """Build the store named by `config.url`; no I/O happens until the first operation."""
    if config.kind is StoreKind.MEMORY:
        return MemoryStore(config.max_records, max_bytes=config.max_bytes)
    # Imported here: redis-py and what it loads are about 20 MiB of RSS that a memory-store
    # sidecar never needs.
    from proxy.stores.redis import RedisStore

    return RedisStore.from_url(config.url, config.timeout)
