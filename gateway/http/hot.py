"""The hot route, ``POST /v1/responses``, served without the Starlette middleware stack.

Every request passes through Starlette's stack — the server-error layer, the metrics and
authentication middleware, the exception layer, the router's match over every route, and the
endpoint wrapper — each an ASGI call with its own ``send`` wrapper. For the one route that
carries nearly all the traffic that costs more than the route's own HTTP work, so
:class:`HotRoutes` sits in front of the stack (:meth:`GatewayApp.build_middleware_stack`) and
does the same steps for it inline, in the same order and with the same outcomes:

1. the same authentication (:meth:`gateway.http.auth.AuthMiddleware.admit`; a 401 is recorded
   under the route ``unmatched``, as the router was never reached);
2. the same handler (:func:`gateway.http.responses.create_response`);
3. the same error rendering (the app's exception handlers: a :class:`gateway.errors.GatewayError`
   or a translated lower-layer error as its JSON body; anything else logged, a 500 JSON body,
   and re-raised for the server to log, as Starlette's server-error layer does);
4. the same metrics (``stepchain_http_request_duration_seconds`` by route, method and status,
   ``stepchain_live_streams`` while an SSE body is sent).

Every other request goes to the Starlette stack unchanged.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, translated_types
from gateway.observe.metrics import Metrics

from .auth import AuthMiddleware, route_path, unauthorized
from .responses import create_response

__all__ = ["CREATE_PATH", "GatewayApp", "HotRoutes"]

#: The route served here (its template, as the metrics name it).
CREATE_PATH = "/v1/responses"


class HotRoutes:
    """Pure ASGI: ``POST /v1/responses`` handled inline (see the module docstring), every other
    request passed to ``stack`` (the app's Starlette middleware stack)."""

    def __init__(
        self,
        stack: ASGIApp,
        *,
        metrics: Metrics,
        auth: AuthMiddleware | None,
        handlers: dict[Any, Any],
    ) -> None:
        self.app = stack  # the Starlette stack: every other request
        self.metrics = metrics
        self.auth = auth
        self.handled = (GatewayError, *translated_types())
        self.on_error = handlers[GatewayError]
        self.on_unexpected = handlers[Exception]
        # (method, status) -> the duration histogram's child for this route.
        self._durations: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and route_path(scope) == CREATE_PATH
        ):
            await self._create(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        m = self.metrics
        status = 500
        template = CREATE_PATH
        streaming = started = False

        async def send_observed(message: Any) -> None:
            # The metrics middleware's view: the status, and whether an SSE body is being sent.
            nonlocal status, streaming, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
                        m.live_streams.inc()
                        break
            await send(message)

        try:
            auth = self.auth
            if auth is not None:
                missing = auth.admit(scope, route_path(scope))
                if missing is not None:
                    template = "unmatched"
                    await unauthorized(scope, send_observed, missing)
                    return
            request = Request(scope, receive)
            try:
                response: Any = await create_response(request)
            except self.handled as exc:
                response = await self.on_error(request, exc)
            if isinstance(response, Response):
                # Response.__call__, without its background-task machinery (there is none).
                await send_observed(
                    {"type": "http.response.start", "status": response.status_code,
                     "headers": response.raw_headers}
                )
                await send({"type": "http.response.body", "body": response.body})
            else:
                await response(scope, receive, send_observed)
        except Exception as exc:
            # Starlette's server-error layer: logged, a 500 body unless one was started, raised.
            error_response = await self.on_unexpected(Request(scope), exc)
            if not started:
                await error_response(scope, receive, send)
            raise
        finally:
            if streaming:
                m.live_streams.dec()
            self._observe(template, scope.get("method", ""), status, time.perf_counter() - start)

    def _observe(self, template: str, method: str, status: int, seconds: float) -> None:
        if template is CREATE_PATH:
            key = (method, status)
            child = self._durations.get(key)
            if child is None:
                m = self.metrics
                child = self._durations[key] = m.child(m.http_duration, template, method, str(status))
        else:
            m = self.metrics
            child = m.child(m.http_duration, template, method, str(status))
        child.observe(seconds)


class GatewayApp(Starlette):
    """The Starlette app with :class:`HotRoutes` in front of its middleware stack.

    ``hot`` holds what the hot route needs besides the stack (set by the app factory):
    ``{"metrics": …, "auth": AuthMiddleware | None}``; the exception handlers are the app's.
    ``startup_failure`` is set by the lifespan when the database failed its start-up: the
    one-line error ``stepchain serve`` exits with (:func:`gateway.cli.serve`).
    """

    hot: dict[str, Any]
    startup_failure: Exception | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return HotRoutes(stack, handlers=self.exception_handlers, **self.hot)
