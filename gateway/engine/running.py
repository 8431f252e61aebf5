"""The tasks of running responses: spawning, finding and cancelling them.

:class:`RunningMixin` is the part of :class:`gateway.engine.service.ResponsesService` that keeps
each response's task in this process (it outlives its HTTP request), cancels one on purpose
(``POST …/cancel``, or a cancel request another replica stored), and starts prepared or claimed
responses in tasks of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequestError
from store.types import ResponseRecord, StepStateError

from .live import LiveStream, LiveStreams
from .tasks import TaskSet

if TYPE_CHECKING:
    from .preparing import Prepared

__all__ = ["CANCEL_WAIT_S", "RunningMixin"]


#: How long ``POST …/cancel`` waits for the response to end (its owner may be another replica).
CANCEL_WAIT_S = 10.0


class RunningMixin:
    """Runs responses in tasks for :class:`ResponsesService` (which holds the attributes)."""

    store: Any
    tasks: TaskSet
    live: LiveStreams
    _running: dict[str, asyncio.Task[Any]]
    _cancel_requested: set[str]
    _watchers: dict[str, asyncio.Task[Any]]

    def spawn(
        self, response_id: str, coro: Coroutine[Any, Any, Any], *, background: bool = False
    ) -> asyncio.Task[Any]:
        """Run ``coro`` (the work of response ``response_id``) as a background task of its own,
        findable by :meth:`running` and :meth:`cancel` until it ends. A ``background``
        response also watches the store for a cancel request from any replica."""
        task = self.tasks.spawn(coro)
        self._running[response_id] = task
        if background:
            old = self._watchers.pop(response_id, None)
            if old is not None:
                old.cancel()
            self._watchers[response_id] = asyncio.ensure_future(self._watch_cancel(response_id))
        task.add_done_callback(lambda _t: self._forget_task(response_id, task))
        return task

    def _forget_task(self, response_id: str, task: asyncio.Task[Any]) -> None:
        if self._running.get(response_id) is task:
            del self._running[response_id]
            self._cancel_requested.discard(response_id)
            watcher = self._watchers.pop(response_id, None)
            if watcher is not None:
                watcher.cancel()

    def running(self, response_id: str) -> asyncio.Task[Any] | None:
        """The task of a response running in this process, None when it is not."""
        task = self._running.get(response_id)
        return task if task is not None and not task.done() else None

    def cancel(self, response_id: str) -> asyncio.Task[Any] | None:
        """Cancel a response running here on purpose: it ends ``cancelled``, its open steps
        ``canceled`` (unlike a shutdown, which leaves it for another process to resume).
        Returns its task (to await), None when it is not running here."""
        task = self.running(response_id)
        if task is not None and response_id not in self._cancel_requested:
            self._cancel_requested.add(response_id)  # once: a second cancel would cut it short
            task.cancel()
        return task

    async def cancel_background(self, record: ResponseRecord) -> ResponseRecord:
        """``POST /v1/responses/{id}/cancel``: stop a background response, on whichever
        replica runs it (a flag in the store that its owner observes), and return its record
        once it has ended (after ``CANCEL_WAIT_S`` at most: as stored then). A finished one is
        returned as it is. Raises InvalidRequestError for a response that is not background."""
        if not record.request.get("background"):
            raise InvalidRequestError(
                "Only background responses can be cancelled.", param="response_id"
            )
        if record.status in ("queued", "in_progress"):
            await self.store.request_cancel(record.id)
            task = self.cancel(record.id)
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT_S)
            else:
                await self._until_finished(record.id, CANCEL_WAIT_S)
        return await self.store.get_response(record.id) or record

    async def _until_finished(self, response_id: str, timeout_s: float) -> None:
        """Wait (``Store.wait_events``) until the response is no longer in progress."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        after = -1
        while loop.time() < deadline:
            record = await self.store.get_response(response_id)
            if record is None or record.status not in ("queued", "in_progress"):
                return
            events = await self.store.list_events(response_id, after=after)
            if events:
                after = events[-1][0]
            await self.store.wait_events(response_id, after, min(1.0, deadline - loop.time()))

    async def _watch_cancel(self, response_id: str) -> None:
        """Cancel the response when a cancel request reaches the store (another replica's)."""
        if await self.store.wait_cancel(response_id):
            self.cancel(response_id)

    async def _cancel_unfinished(self, store: Any, response_id: str) -> None:
        for step in await store.list_steps(response_id):
            if not step.finished:
                try:
                    await store.cancel_step(step.id)
                except StepStateError:
                    pass  # it finished meanwhile

    def start(
        self,
        prepared: Prepared,
        *,
        streamed: bool,
        listener: Callable[[bytes], None] | None = None,
        generate: bool = True,
    ) -> tuple[asyncio.Task[Any], LiveStream | None]:
        """Run a prepared response in a task of its own (it finishes and is stored even if the
        client leaves); ``streamed`` responses get an event log (cached here, durable in the
        store), whose events are also passed to ``listener`` as they are published. Without
        ``generate`` the response is only recorded (:meth:`record_only`). Returns the task and
        the log."""
        log = self.live.open(prepared.record.id) if streamed else None
        if log is not None and listener is not None:
            log.listeners.append(listener)
        builder = self.builder(prepared, emit=None if log is None else log.emit)
        coro = self.run(prepared, builder, log) if generate else self.record_only(prepared, builder, log)
        background = prepared.record.request.get("background") is True
        return self.spawn(prepared.record.id, coro, background=background), log

    def resume_in_task(self, record: ResponseRecord) -> asyncio.Task[Any]:
        """Resume a claimed response in a task of its own (see :meth:`resume`)."""
        background = record.request.get("background") is True
        return self.spawn(record.id, self.resume(record), background=background)
