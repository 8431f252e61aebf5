"""The HTTP surface (Starlette on uvicorn): parse, call one service method, render.

``app`` builds the application and owns its resources (store, HTTP clients, service) in its
lifespan; ``auth`` is the API-key middleware; ``responses``, ``chat``, ``models`` and ``tools``
hold the routes of one resource each; ``bodies`` reads JSON bodies and renders JSON responses;
``sse_response`` streams encoded events. Every error is a :class:`gateway.errors.GatewayError`
rendered once by the app's handler.
"""
