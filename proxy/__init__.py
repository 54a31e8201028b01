"""idemproxy: a sidecar reverse proxy that makes retried requests safe."""

__version__ = "0.1.0"
