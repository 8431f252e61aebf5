"""Observability: what a person or a monitoring system sees of the step chain.

    cost.py      the price table and the cost of a model call (USD per million tokens)
    chain.py     summaries of a response and its steps (duration, tokens, cost) for the UI and CLI
    metrics.py   Prometheus metrics (prometheus-client), multiprocess-aware
    logs.py      structured JSON log lines
    tracing.py   OpenTelemetry spans per the GenAI semantic conventions (optional extra ``otel``)
    hooks.py     the one observer the engine calls: fans out to metrics, logs and tracing

Everything here sits beside ``gateway.protocol``: pure or library-backed, no HTTP, no store I/O.
"""
