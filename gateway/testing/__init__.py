"""Helpers for the demo, the tests and the benchmarks — never used by a serving gateway.

``scripted_upstream`` is a deterministic Chat Completions server (the demo's model);
``serving`` runs an ASGI app under a real uvicorn server on a loopback port.
"""
