"""Idempotency-Key handling: key parsing, request fingerprints, the response recorder and the
route stage that claims, replays and finalises records in a `proxy.stores` store."""
