"""Processes and their lifecycle: serving, signals, drain, config reload, and the workers
supervisor.
"""
