"""``/v1/conversations`` routes (the Conversations API, openai-python ``client.conversations``):

    POST   /v1/conversations                          create ({items?, metadata?})
    GET    /v1/conversations/{id}                     retrieve
    POST   /v1/conversations/{id}                     update ({metadata})
    DELETE /v1/conversations/{id}                     delete
    POST   /v1/conversations/{id}/items               add items ({items}, up to 20)
    GET    /v1/conversations/{id}/items               list (after, limit 1–100, order, include)
    GET    /v1/conversations/{id}/items/{item_id}     retrieve an item
    DELETE /v1/conversations/{id}/items/{item_id}     delete an item (returns the conversation)

Tenant-scoped: another tenant's conversation is a 404. The work is done by
:class:`gateway.engine.conversations.ConversationService`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.engine.conversations import ConversationService, conversation_object

from .bodies import json_response, read_json, tenant_of
from .state import gateway_state

__all__ = ["conversation_routes"]


def _service(request: Request) -> ConversationService:
    return gateway_state(request).service.conversations


async def create_conversation(request: Request) -> Response:
    body = await read_json(request)
    return json_response(await _service(request).create(body, tenant_of(request)))


async def get_conversation(request: Request) -> Response:
    record = await _service(request).get(request.path_params["conversation_id"], tenant_of(request))
    return json_response(conversation_object(record))


async def update_conversation(request: Request) -> Response:
    body = await read_json(request)
    conversation_id = request.path_params["conversation_id"]
    return json_response(await _service(request).update(conversation_id, body, tenant_of(request)))


async def delete_conversation(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    return json_response(await _service(request).delete(conversation_id, tenant_of(request)))


async def add_items(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    # Check the conversation first: a 404 beats a 400 about the body.
    await _service(request).get(conversation_id, tenant_of(request))
    body = await read_json(request)
    return json_response(await _service(request).add_items(conversation_id, body, tenant_of(request)))


async def list_items(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    page = await _service(request).list_items(
        conversation_id, request.query_params, tenant_of(request)
    )
    return json_response(page)


async def get_item(request: Request) -> Response:
    params = request.path_params
    item = await _service(request).get_item(
        params["conversation_id"], params["item_id"], tenant_of(request)
    )
    return json_response(item)


async def delete_item(request: Request) -> Response:
    params = request.path_params
    conversation = await _service(request).delete_item(
        params["conversation_id"], params["item_id"], tenant_of(request)
    )
    return json_response(conversation)


def conversation_routes() -> list[Route]:
    base = "/v1/conversations/{conversation_id}"
    return [
        Route("/v1/conversations", create_conversation, methods=["POST"]),
        Route(base, get_conversation, methods=["GET"]),
        Route(base, update_conversation, methods=["POST"]),
        Route(base, delete_conversation, methods=["DELETE"]),
        Route(base + "/items", add_items, methods=["POST"]),
        Route(base + "/items", list_items, methods=["GET"]),
        Route(base + "/items/{item_id}", get_item, methods=["GET"]),
        Route(base + "/items/{item_id}", delete_item, methods=["DELETE"]),
    ]
