"""Running responses: the service the routes call, the loop, and what keeps it durable.

``service`` prepares a request (validation, history, tools; writes nothing), runs it and stores
its result; ``transition`` is the pure function that decides each next step from the chain;
``loop`` executes those decisions (model calls, concurrent tool calls) and records every step;
``live`` is the durable event log of streamed responses (the store's) with this process's bounded
cache in front of it; ``writer`` fences every write of a response by its owner epoch and carries
its pending events in the same transaction; ``recovery`` registers this process's liveness,
renews leases and resumes responses whose owner died; ``tasks`` owns the background tasks.
"""
