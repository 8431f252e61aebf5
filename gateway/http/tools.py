"""The tool admin API: register, list, read, replace and delete server-side tools.

    POST   /v1/tools          → 201, the tool        (409 if the name is taken)
    GET    /v1/tools          → {"object": "list", "data": [tools]}
    GET    /v1/tools/{name}   → the tool             (404 if unknown)
    PUT    /v1/tools/{name}   → the tool             (404 if unknown)
    DELETE /v1/tools/{name}   → {"name", "object": "tool", "deleted": true}

Tools are shown with :func:`executors.registry.public_view` (literal header values as ``"***"``).
When ``settings.admin_key`` is set, every route needs ``Authorization: Bearer <admin key>``.
Handlers read the registry and the settings from :func:`gateway.http.state.gateway_state`.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from executors.registry import ToolRegistry, public_view
from gateway.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from store import types as store_types

from .bodies import json_response, read_json_body
from .state import gateway_state

__all__ = ["tool_routes"]

# A tool definition is small; a larger body is a mistake, not a tool.
MAX_TOOL_BODY_BYTES = 1_000_000



def _registry(request: Request) -> ToolRegistry:
    """The registry, once the admin key (if one is configured) has been checked.

    A gateway with tenant keys but no admin key keeps the admin API closed (403): a tool
    registered by one tenant would be offered to, and run for, every tenant.
    """
    gateway = gateway_state(request)
    settings = gateway.settings
    admin_key = settings.admin_key
    if not admin_key and (settings.api_keys or settings.api_keys_file):
        raise PermissionDeniedError(
            "The tool admin API is closed on a gateway with API keys until STEPCHAIN_ADMIN_KEY is set."
        )
    if admin_key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), admin_key.get_secret_value().encode()
        ):
            raise AuthenticationError(
                "The tool admin API needs the admin key: Authorization: Bearer <admin key>."
            )
    return gateway.registry


async def _read_body(request: Request) -> Any:
    return await read_json_body(request, MAX_TOOL_BODY_BYTES)


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"Tool '{name}' not found.", param="name")


async def create_tool(request: Request) -> Response:
    registry = _registry(request)
    body = await _read_body(request)
    try:
        definition = await registry.register(body)  # ToolDefinitionError: 400 via the boundary
    except store_types.StoreConflictError:
        name = body["name"]
        raise ConflictError(f"A tool named '{name}' already exists.", param="name") from None
    return json_response(public_view(definition), 201)


async def list_tools(request: Request) -> Response:
    registry = _registry(request)
    tools = await registry.list()
    return json_response({"object": "list", "data": [public_view(t) for t in tools]})


async def get_tool(request: Request) -> Response:
    registry = _registry(request)
    name = request.path_params["name"]
    definition = await registry.get(name)
    if definition is None:
        raise _not_found(name)
    return json_response(public_view(definition))


async def replace_tool(request: Request) -> Response:
    registry = _registry(request)
    name = request.path_params["name"]
    body = await _read_body(request)
    try:
        definition = await registry.replace(name, body)  # ToolDefinitionError: 400
    except store_types.StoreNotFoundError:
        raise _not_found(name) from None
    return json_response(public_view(definition))


async def delete_tool(request: Request) -> Response:
    registry = _registry(request)
    name = request.path_params["name"]
    if not await registry.delete(name):
        raise _not_found(name)
    return json_response({"name": name, "object": "tool", "deleted": True})


def tool_routes() -> list[Route]:
    """The five admin routes under ``/v1/tools``."""
    return [
        Route("/v1/tools", create_tool, methods=["POST"]),
        Route("/v1/tools", list_tools, methods=["GET"]),
        Route("/v1/tools/{name}", get_tool, methods=["GET"]),
        Route("/v1/tools/{name}", replace_tool, methods=["PUT"]),
        Route("/v1/tools/{name}", delete_tool, methods=["DELETE"]),
    ]
