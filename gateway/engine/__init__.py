"""Running responses: the service the routes call, the loop, and what keeps it durable.

``service`` prepares a request (validation, history, tools; writes nothing), runs it and stores
its result; ``transition`` is the pure function that decides each next step from the chain;
``loop`` executes those decisions (model calls, concurrent tool calls) and records every step;
``live`` keeps the encoded events of running responses for their followers; ``recovery`` renews
leases and resumes responses whose process died; ``tasks`` owns the background tasks.
"""
