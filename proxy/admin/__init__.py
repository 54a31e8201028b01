"""The admin port: health checks and the /live /ready /health endpoints, its thread, fleet metrics.
"""
