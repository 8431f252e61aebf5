"""The history cache: conversations by response id, for ``previous_response_id``.

Each entry is a response's conversation — the ids of the responses in it and its items (earlier
inputs and outputs, then its own) — so a follow-up need not read the whole chain from the store.
The cache is bounded by entries and by bytes (the entries' JSON size; a follow-up's size is its
previous entry's plus what it added, so nothing is measured twice); the least recently used
entries go first, and one larger than the whole cap is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

__all__ = ["HistoryCache"]

Conversation = tuple[frozenset[str], list[dict[str, Any]]]


class HistoryCache:
    """Conversations by response id, within ``max_entries`` and ``max_bytes``."""

    def __init__(self, *, max_entries: int = 2048, max_bytes: int = 256_000_000) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Conversation] = OrderedDict()
        self._sizes: dict[str, int] = {}

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> Conversation | None:
        """The cached conversation ending with ``response_id`` (now the most recently used)."""
        cached = self._entries.get(response_id)
        if cached is not None:
            self._entries.move_to_end(response_id)
        return cached

    def put(
        self,
        response_id: str,
        ids: frozenset[str],
        items: list[dict[str, Any]],
        *,
        previous_id: str | None = None,
        added: list[dict[str, Any]] | None = None,
    ) -> None:
        """Cache a conversation; ``added`` are its items beyond ``previous_id``'s (measured alone
        when that entry is cached, else the whole conversation is)."""
        base = self._sizes.get(previous_id) if previous_id else 0
        if base is None or added is None:
            base, added = 0, items
        try:
            size = base + len(orjson.dumps(added))
        except TypeError:
            return
        self._drop(response_id)
        if size > self.max_bytes:
            return
        self._entries[response_id] = (ids, items)
        self._sizes[response_id] = size
        self.bytes += size
        while self._entries and (
            len(self._entries) > self.max_entries or self.bytes > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))

    def forget_containing(self, response_id: str) -> None:
        """Drop every conversation that holds ``response_id``'s items."""
        for key in [k for k, (ids, _items) in self._entries.items() if response_id in ids]:
            self._drop(key)

    def _drop(self, response_id: str) -> None:
        if self._entries.pop(response_id, None) is not None:
            self.bytes -= self._sizes.pop(response_id, 0)
