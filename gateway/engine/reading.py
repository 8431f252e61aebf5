"""Reading responses back: visibility, conversation history (cached), input items, steps.

:class:`ReadingMixin` is the part of :class:`gateway.engine.service.ResponsesService` that reads
the store: ``get_visible`` (tenant and ``store`` rules), the conversation items up to a response
(``previous_response_id`` chains, cached per process in a :class:`HistoryCache`), the input items
``input_items`` lists, and the recorded step chain.
"""

from __future__ import annotations

from collections import OrderedDict
from types import EllipsisType
from typing import Any

from gateway.errors import PreviousResponseNotFoundError
from gateway.protocol.convert import normalize_input
from gateway.protocol.response_object import response_object
from store.types import ResponseRecord, Step

from .history import HistoryCache
from .references import ItemResolver

__all__ = ["HISTORY_CACHE_SIZE", "ReadingMixin", "record_to_object"]


# How many conversations' histories one process keeps (each a list of items).
HISTORY_CACHE_SIZE = 2048


def record_to_object(record: ResponseRecord) -> dict[str, Any]:
    """The Responses API ``Response`` object for a stored response record."""
    return response_object(
        id=record.id,
        created_at=record.created_at,
        model=record.model,
        request=record.request,
        status=record.status,
        output=record.output,
        usage=record.usage,
        error=record.error,
        incomplete_details=record.incomplete_details,
        completed_at=record.completed_at,
    )


class ReadingMixin:
    """Reads stored responses for :class:`ResponsesService` (which holds the attributes)."""

    store: Any
    _history: HistoryCache
    _deleted: OrderedDict[str, None]

    async def get_visible(
        self, response_id: str, tenant: str | None, *, any_tenant: bool = False
    ) -> ResponseRecord | None:
        """The stored response if this tenant (or the admin: ``any_tenant``) may read it
        (``store: false`` ones are never)."""
        record = await self.store.get_response(response_id)
        if record is None or not record.store or (record.tenant != tenant and not any_tenant):
            return None
        return record

    async def conversation_items(self, record: ResponseRecord) -> list[dict[str, Any]]:
        """Every item of the conversation ending with ``record``: earlier inputs and outputs,
        oldest first, then this response's input and output (instructions are not items).
        Deleted responses are left out."""
        return (await self._conversation(record))[1]

    async def _conversation(
        self, record: ResponseRecord
    ) -> tuple[frozenset[str], list[dict[str, Any]]]:
        cached = self._history.get(record.id)
        if cached is not None:
            return cached
        ids: frozenset[str] = frozenset()
        items: list[dict[str, Any]] = []
        if record.previous_response_id:
            previous = await self.store.get_response(record.previous_response_id)
            if previous is not None:
                ids, earlier = await self._conversation(previous)
                items = list(earlier)
        inputs = normalize_input(record.request.get("input", []), record.id)
        if any(item["type"] == "item_reference" for item in inputs):
            inputs = await ItemResolver(self.store, record.tenant).resolve(inputs, strict=False)
        items.extend(inputs)
        items.extend(record.output)
        ids = ids | {record.id}
        self._remember(
            record.id, ids, items, previous_id=record.previous_response_id,
            added=inputs + list(record.output),
        )
        return ids, items

    async def history_for(self, previous_id: str | None, tenant: str | None) -> list[dict[str, Any]]:
        """The conversation items up to ``previous_id`` (none for None); 400
        ``previous_response_not_found`` if this tenant cannot read that response."""
        if not previous_id:
            return []
        previous = await self.get_visible(previous_id, tenant)
        if previous is None:
            raise PreviousResponseNotFoundError(
                f"Previous response with id '{previous_id}' not found.",
                param="previous_response_id",
            )
        return list(await self.conversation_items(previous))

    async def input_items(self, record: ResponseRecord) -> list[dict[str, Any]]:
        """The input items of a stored response as ``input_items`` lists them: normalized, with
        ``item_reference`` items resolved to the items they named (if still there)."""
        items = normalize_input(record.request.get("input", []), record.id)
        if any(item["type"] == "item_reference" for item in items):
            items = await ItemResolver(self.store, record.tenant).resolve(items, strict=False)
        return items

    def _remember(
        self,
        response_id: str,
        ids: frozenset[str],
        items: list[dict[str, Any]],
        *,
        previous_id: str | None = None,
        added: list[dict[str, Any]] | None = None,
    ) -> None:
        if not ids.isdisjoint(self._deleted):
            return  # an earlier response was deleted while this one ran: rebuild it when asked
        self._history.put(response_id, ids, items, previous_id=previous_id, added=added)

    def _forget(self, response_id: str) -> None:
        """Drop every cached conversation that holds ``response_id``'s items."""
        self._deleted[response_id] = None
        if len(self._deleted) > HISTORY_CACHE_SIZE:
            self._deleted.popitem(last=False)
        self._history.forget_containing(response_id)

    async def steps(
        self, record: ResponseRecord, scope_parent: str | None | EllipsisType = ...
    ) -> list[Step]:
        """The recorded step chain: every step of every scope by ``sequence`` (the default),
        or one scope's (``scope_parent`` None: the top level; a step id: that sub-agent's)."""
        if scope_parent is ...:
            return await self.store.list_steps(record.id)
        return await self.store.list_chain(record.id, scope_parent)

    async def _conversation_root(self, record: ResponseRecord) -> str:
        """The first response of ``record``'s ``previous_response_id`` chain (at most 100 back)."""
        root = record
        for _ in range(100):
            if not root.previous_response_id:
                break
            previous = await self.store.get_response(root.previous_response_id)
            if previous is None:
                return root.previous_response_id
            root = previous
        return root.id
