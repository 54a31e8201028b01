"""Reaching Redis: the own RESP client, redis-py for TLS/Sentinel/Cluster, and the Lua script
runners.
"""
