"""``GET /v1/models`` (passed through to the upstream), ``GET /healthz`` and ``GET /metrics``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.observe.metrics import CONTENT_TYPE_LATEST, render_metrics

from .bodies import JSON, json_response
from .state import gateway_state

__all__ = ["model_routes"]


async def list_models(request: Request) -> Response:
    """``GET /v1/models`` passed through to the upstream."""
    # An UpstreamError (no answer) is translated by the app's error handler: 502.
    upstream_response = await gateway_state(request).upstream.get("models")
    return Response(
        upstream_response.content,
        status_code=upstream_response.status_code,
        media_type=upstream_response.headers.get("content-type", JSON),
    )


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def prometheus_metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format (:mod:`gateway.observe.metrics`); open like
    ``/healthz`` — no ids, keys or contents in it."""
    return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)


def model_routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
    ]
