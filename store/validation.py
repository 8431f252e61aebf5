"""Argument checks every backend makes before touching its database (ValueError on bad input),
and the constants they share: which response fields may be updated, which statuses count as
unfinished, how conversation item pages are asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .types import MODEL_CALL, TOOL_CALL, Fence, FencedError, StoreNotFoundError, StepDescriptor

__all__ = [
    "RESPONSE_JSON_FIELDS",
    "RESPONSE_UPDATABLE",
    "UNFINISHED_STATUSES",
    "check_conversation_items",
    "check_fence",
    "check_events",
    "check_kinds",
    "check_step_ids",
    "check_page",
    "check_response_fields",
]

RESPONSE_JSON_FIELDS = frozenset({"output", "usage", "error", "incomplete_details", "metadata"})
RESPONSE_UPDATABLE = RESPONSE_JSON_FIELDS | {"status", "completed_at"}
#: Statuses of a response that is still running (claimable, not purged, not terminal).
UNFINISHED_STATUSES = ("queued", "in_progress")
MAX_PAGE = 1000


def check_response_fields(fields: dict[str, Any]) -> None:
    """ValueError for a field :meth:`store.base.Store.update_response` cannot set."""
    unknown = fields.keys() - RESPONSE_UPDATABLE
    if unknown:
        raise ValueError(
            f"cannot update response field(s) {sorted(unknown)}; "
            f"allowed: {sorted(RESPONSE_UPDATABLE)}"
        )


def check_kinds(descriptors: Sequence[StepDescriptor]) -> None:
    """ValueError for a step kind other than ``model_call`` / ``tool_call``."""
    for d in descriptors:
        if d.kind not in (MODEL_CALL, TOOL_CALL):
            raise ValueError(f"unknown step kind {d.kind!r}")


def check_step_ids(ids: Sequence[str] | None, descriptors: Sequence[StepDescriptor]) -> list[str] | None:
    """``ids`` as a list; ValueError unless None or one distinct non-empty string per descriptor."""
    if ids is None:
        return None
    ids = list(ids)
    if len(ids) != len(descriptors) or len(set(ids)) != len(ids):
        raise ValueError("ids: one distinct step id per descriptor")
    if not all(isinstance(i, str) and i for i in ids):
        raise ValueError("ids: step ids are non-empty strings")
    return ids


def check_events(events: tuple[int, Sequence[bytes]] | None) -> None:
    """ValueError unless ``events`` is None or ``(first_sequence >= 0, [bytes, ...])``."""
    if events is None:
        return
    first, data = events
    if not isinstance(first, int) or first < 0:
        raise ValueError(f"first_sequence must be an int >= 0, not {first!r}")
    for event in data:
        if not isinstance(event, (bytes, bytearray, memoryview)):
            raise ValueError(f"events must be bytes, not {type(event).__name__}")


def check_conversation_items(items: Sequence[dict[str, Any]]) -> list[str]:
    """The items' ids; ValueError unless each item is a dict with a string ``id``, none twice."""
    ids = []
    for item in items:
        item_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item_id, str) or not item_id:
            raise ValueError("every conversation item needs a string 'id'")
        ids.append(item_id)
    if len(set(ids)) != len(ids):
        raise ValueError("conversation item ids must be unique")
    return ids


def check_page(limit: int, order: str = "desc") -> None:
    """ValueError for a page size outside 1..1000 or an order other than asc/desc."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit!r}")
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")


def check_fence(fence: Fence | None, what: str, row: Sequence[Any] | None) -> None:
    """Inside a write's transaction: StoreNotFoundError when ``row`` is None (no such response or
    step), FencedError when ``fence`` is given and ``row[-2:]`` (the response's owner and
    owner_epoch now) differ from it."""
    if row is None:
        raise StoreNotFoundError(f"{what} not found")
    if fence is not None and (row[-2], row[-1]) != (fence.owner, fence.epoch):
        raise FencedError(
            f"{what}: fence {fence.owner!r}/{fence.epoch} is stale (now {row[-2]!r}/{row[-1]})"
        )
