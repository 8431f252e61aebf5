"""Context endpoints beside ``/v1/responses``: ``POST /v1/responses/compact`` and
``POST /v1/responses/input_tokens``.

``compact`` (openai-python ``responses.compact``) returns a ``response.compaction`` object
whose output ends with a ``compaction`` item (:mod:`gateway.engine.compaction`);
``input_tokens`` (``responses.input_tokens.count``) returns
``{"object": "response.input_tokens", "input_tokens": N}`` (:mod:`gateway.engine.tokens`).
Both check the whole body before the upstream is called.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.engine.compaction import compact
from gateway.engine.service import ResponsesService
from gateway.engine.tokens import count_input_tokens

from .bodies import json_response, read_json, tenant_of
from .state import gateway_state

__all__ = ["context_routes"]


async def compact_response(request: Request) -> Response:
    service: ResponsesService = gateway_state(request).service
    body = await read_json(request)
    result = await compact(
        service,
        body,
        tenant_of(request),
        key=service.encrypted_content_key,
        upstream_key=request.scope.get("stepchain.client_key"),
    )
    return json_response(result)


async def input_tokens(request: Request) -> Response:
    body = await read_json(request)
    count = await count_input_tokens(
        gateway_state(request).service,
        gateway_state(request).token_counter,
        body,
        tenant_of(request),
        upstream_key=request.scope.get("stepchain.client_key"),
    )
    return json_response({"object": "response.input_tokens", "input_tokens": count})


def context_routes() -> list[Route]:
    return [
        Route("/v1/responses/compact", compact_response, methods=["POST"]),
        Route("/v1/responses/input_tokens", input_tokens, methods=["POST"]),
    ]
