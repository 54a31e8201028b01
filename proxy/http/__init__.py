"""HTTP primitives shared by every layer: headers, problem+json, request checks, the request
context and body.
"""
