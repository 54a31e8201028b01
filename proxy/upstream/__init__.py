"""The upstream side: targets and weights, retry policy, circuit breaker and the HTTP/1.1
transport.
"""
