"""The Conversations API over the step-chain store: conversations and their items, per tenant.

Shapes follow openai-python ``types/conversations/``::

    Conversation          {"id": "conv_…", "object": "conversation", "created_at": int, "metadata": {…}}
    deleted               {"id", "object": "conversation.deleted", "deleted": true}
    ConversationItemList  {"object": "list", "data": [item…], "first_id", "last_id", "has_more"}

Items are Responses items (``message``, ``function_call``, ``function_call_output``, …) as
:func:`gateway.protocol.convert.normalize_input` accepts them, each stored with an ``id`` (given,
or ``msg_…``/``fc_…`` made here). A conversation belongs to the tenant that created it; another
tenant gets 404, as for a conversation that does not exist.

``POST /v1/responses`` with ``conversation`` (an id or ``{"id"}``) uses :meth:`history` as the
response's history; the service appends the response's input and output to the conversation
in the same store transaction as the response's result (``conversation_items=``).
"""

from __future__ import annotations

import time
from typing import Any

from gateway.errors import InvalidRequestError, NotFoundError
from gateway.protocol.checks import bad_value
from gateway.protocol.convert import normalize_input
from store.base import Store
from store.types import ConversationRecord, StoreNotFoundError, new_id

__all__ = [
    "MAX_ITEMS_PER_REQUEST",
    "ConversationService",
    "conversation_id_of",
    "conversation_object",
    "validate_metadata",
]

#: Items one create call may add (OpenAI: "up to 20 items at a time").
MAX_ITEMS_PER_REQUEST = 20
_PAGE = 1000


def conversation_object(record: ConversationRecord) -> dict[str, Any]:
    """The API's ``Conversation`` object for a stored record."""
    return {
        "id": record.id,
        "object": "conversation",
        "created_at": int(record.created_at),
        "metadata": record.metadata or {},
    }


def validate_metadata(metadata: Any, param: str = "metadata") -> dict[str, str]:
    """``metadata`` as the API allows it: up to 16 string pairs, keys ≤ 64 and values ≤ 512
    characters; None is ``{}``. Raises InvalidRequestError naming ``param``."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise bad_value(param, "an object of string keys and string values")
    if len(metadata) > 16:
        raise bad_value(param, "at most 16 keys")
    for key, value in metadata.items():
        if len(key) > 64:
            raise bad_value(param, "keys of at most 64 characters")
        if not isinstance(value, str) or len(value) > 512:
            raise bad_value(f"{param}.{key}", "a string of at most 512 characters")
    return dict(metadata)


def conversation_id_of(value: Any) -> str | None:
    """The id in a create body's ``conversation`` (a string or ``{"id": …}``); None if absent.
    Raises InvalidRequestError (param ``conversation``) for anything else."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise bad_value("conversation", "a conversation id or an object with an 'id'")
    return value


def _items(raw: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise bad_value(param, "a list of items")
    if len(raw) > MAX_ITEMS_PER_REQUEST:
        raise bad_value(param, f"at most {MAX_ITEMS_PER_REQUEST} items")
    try:
        items = normalize_input(raw, new_id("conv"))
    except InvalidRequestError as exc:  # name the field as sent: items[2].role, not input[2].role
        if exc.param and exc.param.startswith("input"):
            exc.param = param + exc.param[len("input"):]
        raise
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        raise bad_value(param, "items with distinct ids")
    return items


class ConversationService:
    """Conversation CRUD for the HTTP layer; every method takes the caller's tenant."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, conversation_id: str, tenant: str | None) -> ConversationRecord:
        """The conversation if this tenant may read it; 404 ``NotFoundError`` otherwise."""
        record = await self.store.get_conversation(conversation_id)
        if record is None or record.tenant != tenant:
            raise NotFoundError(
                f"Conversation with id '{conversation_id}' not found.", param="conversation_id"
            )
        return record

    async def create(self, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        """``POST /v1/conversations``: ``{items?, metadata?}`` → Conversation."""
        metadata = validate_metadata(body.get("metadata"))
        items = _items(body.get("items") or [], "items")
        record = ConversationRecord(
            id=new_id("conv"), tenant=tenant, created_at=time.time(), metadata=metadata
        )
        await self.store.create_conversation(record, items)
        return conversation_object(record)

    async def update(self, conversation_id: str, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        """``POST /v1/conversations/{id}``: replaces ``metadata`` (required)."""
        await self.get(conversation_id, tenant)
        if "metadata" not in body:
            raise bad_value("metadata", "an object of string keys and string values")
        metadata = validate_metadata(body.get("metadata"))
        return conversation_object(await self.store.update_conversation(conversation_id, metadata))

    async def delete(self, conversation_id: str, tenant: str | None) -> dict[str, Any]:
        """``DELETE /v1/conversations/{id}``: the conversation and its items."""
        await self.get(conversation_id, tenant)
        await self.store.delete_conversation(conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def add_items(
        self, conversation_id: str, body: dict[str, Any], tenant: str | None
    ) -> dict[str, Any]:
        """``POST /v1/conversations/{id}/items``: ``{items}`` appended → the added items as a
        list. An item id the conversation holds already is a 400."""
        await self.get(conversation_id, tenant)
        if "items" not in body:
            raise bad_value("items", "a list of items")
        items = _items(body["items"], "items")
        for i, item_id in enumerate(item["id"] for item in items):
            if await self.store.get_conversation_item(conversation_id, item_id) is not None:
                raise InvalidRequestError(
                    f"The conversation already has an item with id '{item_id}'.",
                    param=f"items[{i}].id",
                )
        await self.store.add_conversation_items(conversation_id, items)
        return _page(items, has_more=False)

    async def list_items(
        self, conversation_id: str, query: Any, tenant: str | None
    ) -> dict[str, Any]:
        """``GET /v1/conversations/{id}/items?after&limit&order&include``: one page."""
        await self.get(conversation_id, tenant)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_value("order", "'asc' or 'desc'")
        raw_limit = query.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            raise bad_value("limit", "an integer from 1 to 100")
        after = query.get("after") or None
        if after is not None and await self.store.get_conversation_item(conversation_id, after) is None:
            raise InvalidRequestError(f"No item with id '{after}' in this conversation.", param="after")
        try:
            items, has_more = await self.store.list_conversation_items(
                conversation_id, after=after, limit=int(raw_limit), order=order
            )
        except StoreNotFoundError:  # deleted meanwhile
            raise NotFoundError(
                f"Conversation with id '{conversation_id}' not found.", param="conversation_id"
            ) from None
        return _page(items, has_more=has_more)

    async def get_item(self, conversation_id: str, item_id: str, tenant: str | None) -> dict[str, Any]:
        await self.get(conversation_id, tenant)
        item = await self.store.get_conversation_item(conversation_id, item_id)
        if item is None:
            raise NotFoundError(f"Item with id '{item_id}' not found.", param="item_id")
        return item

    async def delete_item(
        self, conversation_id: str, item_id: str, tenant: str | None
    ) -> dict[str, Any]:
        """``DELETE /v1/conversations/{id}/items/{item_id}`` → the Conversation."""
        record = await self.get(conversation_id, tenant)
        if not await self.store.delete_conversation_item(conversation_id, item_id):
            raise NotFoundError(f"Item with id '{item_id}' not found.", param="item_id")
        return conversation_object(record)

    async def history(self, conversation_id: str, tenant: str | None) -> list[dict[str, Any]]:
        """Every item of the conversation, oldest first (the history of a response that uses
        it). 404 ``NotFoundError`` (param ``conversation``) for one this tenant cannot read."""
        record = await self.store.get_conversation(conversation_id)
        if record is None or record.tenant != tenant:
            raise NotFoundError(
                f"Conversation with id '{conversation_id}' not found.", param="conversation"
            )
        items: list[dict[str, Any]] = []
        after = None
        while True:
            page, has_more = await self.store.list_conversation_items(
                conversation_id, after=after, limit=_PAGE, order="asc"
            )
            items.extend(page)
            if not has_more or not page:
                return items
            after = page[-1]["id"]


def _page(items: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
