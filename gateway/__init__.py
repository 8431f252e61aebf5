"""The ASGI gateway: routes, Responses <-> Chat Completions conversion, streaming events, the loop."""
