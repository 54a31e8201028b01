"""The data plane's request pipeline: the composition root (runtime), routing and the forwarding
stages.
"""
