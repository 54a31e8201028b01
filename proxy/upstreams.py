"""Runtime upstreams: the transports for each configured target and the choice between them."""

from __future__ import annotations

from proxy.config import Upstream as UpstreamConfig
from proxy.transport import AiohttpTransport, Transport
from proxy.transport_h1 import H1Transport

TRANSPORTS: dict[str, type[AiohttpTransport] | type[H1Transport]] = {
    "h1": H1Transport,
    "aiohttp": AiohttpTransport,
}


class Upstream:
    """A named upstream and its target transports."""

    __slots__ = ("config", "name", "transports")

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        kind = TRANSPORTS[config.transport]
        self.transports: list[Transport] = [
            kind(
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
