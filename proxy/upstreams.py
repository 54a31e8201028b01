"""Runtime upstreams: the transports for each configured target and the choice between them."""

from __future__ import annotations

from proxy.config import Upstream as UpstreamConfig
from proxy.transport import AiohttpTransport, Transport


class Upstream:
    """A named upstream and its target transports."""

    __slots__ = ("config", "name", "transports")

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.transports: list[Transport] = [
            AiohttpTransport(
                url,
                connect_timeout=config.connect_timeout,
                timeout=config.timeout,
                max_connections=config.max_connections,
            )
            for url in config.target_urls
        ]

    def pick(self) -> Transport:
        return self.transports[0]

    async def close(self) -> None:
        for transport in self.transports:
            await transport.close()
