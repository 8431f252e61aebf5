"""``item_reference`` input items resolved to the stored items they name.

Clients that keep responses stored (``store: true``) may send earlier items back by id only —
``{"type": "item_reference", "id": "msg_…"}``, as the Vercel AI SDK does when it continues a
conversation. No table of items is needed: every id the gateway gives an item names where the
item lives (see :mod:`gateway.protocol.events` and :func:`gateway.protocol.convert.normalize_input`):

* output items (``msg_<h>``, ``rs_<h>``, ``fc_<h>_<n>``, ``ctc_<h>_<n>``, ``mcp_<h>_<n>``) carry
  the hex ``h`` of the model-call step ``step_<h>`` (or, for an ``mcp_call`` opened from a tool
  step after a resume, of that tool step) — the step names its response, whose stored output
  holds the item;
* input items without a client id (``<prefix>_<h>_<i>``) carry the hex of their response
  ``resp_<h>``, whose stored request holds the item at position ``i``.

A reference resolves only to a response that the caller's tenant may read and that was stored
(``store: true``); anything else is unknown, a 400 naming the param (``input[3].id``), as
OpenAI answers for an id it does not know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequestError

from gateway.protocol.convert import normalize_input

if TYPE_CHECKING:
    from store.base import Store
    from store.types import ResponseRecord

__all__ = ["ItemResolver", "reference_hex"]


def reference_hex(item_id: str) -> str | None:
    """The hex part of one of the gateway's item ids (``msg_<hex>[_<n>]``), else None."""
    parts = item_id.split("_")
    if len(parts) < 2 or not parts[1]:
        return None
    hex_part = parts[1]
    try:
        int(hex_part, 16)
    except ValueError:
        return None
    return hex_part


class ItemResolver:
    """Resolves the ``item_reference`` items of one request (``tenant``: the caller's)."""

    def __init__(self, store: Store, tenant: str | None) -> None:
        self.store = store
        self.tenant = tenant
        self._items: dict[str, dict[str, dict[str, Any]]] = {}  # response id -> id -> item

    async def resolve(
        self, items: list[dict[str, Any]], *, strict: bool = True
    ) -> list[dict[str, Any]]:
        """``items`` with every ``item_reference`` replaced by the item it names (a copy).

        Raises InvalidRequestError (``param`` ``input[i].id``) for an id this tenant cannot
        resolve; with ``strict=False`` (rebuilding stored history) such references are dropped.
        """
        resolved = []
        for i, item in enumerate(items):
            if item.get("type") != "item_reference":
                resolved.append(item)
                continue
            found = await self._find(item["id"])
            if found is not None:
                resolved.append(found)
            elif strict:
                raise InvalidRequestError(
                    f"Item with id '{item['id']}' not found.", param=f"input[{i}].id"
                )
        return resolved

    async def _find(self, item_id: str) -> dict[str, Any] | None:
        hex_part = reference_hex(item_id)
        if hex_part is None:
            return None
        record = await self._visible(await self.store.get_response(f"resp_{hex_part}"))
        if record is None:
            step = await self.store.get_step(f"step_{hex_part}")
            if step is not None:
                record = await self._visible(await self.store.get_response(step.response_id))
        if record is None:
            return None
        return self._index(record).get(item_id)

    async def _visible(self, record: ResponseRecord | None) -> ResponseRecord | None:
        if record is None or not record.store or record.tenant != self.tenant:
            return None
        return record

    def _index(self, record: ResponseRecord) -> dict[str, dict[str, Any]]:
        index = self._items.get(record.id)
        if index is None:
            index = {}
            inputs = normalize_input(record.request.get("input", []), record.id)
            for item in (*inputs, *record.output):
                if isinstance(item.get("id"), str) and item.get("type") != "item_reference":
                    index[item["id"]] = item
            self._items[record.id] = index
        return index
