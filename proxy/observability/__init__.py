"""Trace ids, the access log, events, the log sink and the Prometheus instruments."""
