"""One response from request to stored result: the service the HTTP routes call.

:class:`ResponsesService` (one per process) holds the state and is assembled from one mixin per
concern, each in its own module:

- :mod:`gateway.engine.preparing` — ``prepare``: everything that can fail with a 4xx before
  anything is written (validation, history, tool offering, the first Chat Completions body);
- :mod:`gateway.engine.driving` — ``run``/``resume``: create the record, run the loop with a
  :class:`gateway.protocol.events.ResponseBuilder` observing it, store the result *before* the
  terminal event;
- :mod:`gateway.engine.running` — the tasks responses run in, and cancelling them;
- :mod:`gateway.engine.reading` — visibility, conversation history, input items, steps.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from store.types import ResponseRecord

from .chat import run_chat_completion
from .conversations import ConversationService
from .driving import DrivingMixin
from .history import HistoryCache
from .live import LiveStreams
from .loop import LoopDeps
from .preparing import Prepared, PreparingMixin
from .reading import HISTORY_CACHE_SIZE, ReadingMixin, record_to_object
from .running import CANCEL_WAIT_S, RunningMixin
from .tasks import TaskSet

__all__ = ["CANCEL_WAIT_S", "Prepared", "ResponsesService", "record_to_object"]


class ResponsesService(PreparingMixin, DrivingMixin, RunningMixin, ReadingMixin):
    """Creates, runs and reads responses for the HTTP layer (one instance per process)."""

    def __init__(
        self,
        deps: LoopDeps,
        *,
        owner: str | None = None,
        lease_s: float = 30.0,
        live: LiveStreams | None = None,
        flush_s: float = 0.025,
        hosted_tool_map: dict[str, str] | None = None,
        encrypted_content_key: str | None = None,
        reasoning_to_upstream: str = "encrypted",
        context_windows: dict[str, int] | None = None,
        history_max_bytes: int = 256_000_000,
        tasks: TaskSet | None = None,
    ) -> None:
        self.deps = deps
        # The background tasks responses run in (they outlive their HTTP request).
        self.tasks = tasks if tasks is not None else TaskSet()
        # Hosted tool type (web_search, …) -> the registered tool that implements it.
        self.hosted_tool_map = dict(hosted_tool_map or {})
        # Seals and opens encrypted_content (compaction and reasoning items); None: refused.
        self.encrypted_content_key = encrypted_content_key
        # Which input reasoning goes back upstream as reasoning_content: off | encrypted | all.
        self.reasoning_to_upstream = reasoning_to_upstream
        # Context window in tokens by model name ("*": any other), for truncation and compaction.
        self.context_windows = dict(context_windows or {})
        self.store = deps.store
        self.conversations = ConversationService(deps.store)
        self.owner = owner
        self.lease_s = lease_s
        self.live = live if live is not None else LiveStreams()
        self.flush_s = flush_s
        # The task of each response running in this process, those being cancelled on purpose
        # (not by a shutdown), and the cancel-request watchers of background ones: the one
        # place cancellation is kept (the request itself is a flag in the store).
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancel_requested: set[str] = set()
        self._watchers: dict[str, asyncio.Task[Any]] = {}
        # response id -> (the ids of the responses in its conversation, the conversation's items
        # up to and including that response's output).
        self._history = HistoryCache(max_entries=HISTORY_CACHE_SIZE, max_bytes=history_max_bytes)
        # Recently deleted responses: a conversation holding one is not cached again.
        self._deleted: OrderedDict[str, None] = OrderedDict()

    async def chat_completion(
        self,
        body: dict[str, Any],
        tenant: str | None,
        *,
        upstream_key: str | None = None,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """A Chat Completions call passed through and recorded (:mod:`gateway.engine.chat`);
        ``upstream_key`` replaces the gateway's upstream key (pass_client_key)."""
        upstream = self.deps.upstream
        if upstream_key:
            upstream = upstream.with_api_key(upstream_key)
        return await run_chat_completion(
            self.store, upstream, body, tenant=tenant, owner=self.owner, lease_s=self.lease_s,
            on_chunk=on_chunk, observer=self.deps.observer,
        )

    async def delete(self, record: ResponseRecord) -> None:
        """Delete a stored response; later responses that continue a conversation through it
        no longer see its items (its children keep theirs). Raises StoreError."""
        await self.store.delete_response(record.id)
        self._forget(record.id)

