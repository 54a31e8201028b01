"""Per-tenant quotas: the GCRA limiter (memory or Redis) and the stage that applies it."""
