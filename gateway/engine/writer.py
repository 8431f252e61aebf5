"""The store as one response's loop sees it: fenced writes that carry the response's events.

:class:`ResponseWriter` wraps the process's store for one response. Every write of the
response's loop (every scope: sub-agents too) goes through it and

- carries the response's :class:`store.types.Fence` (owner + epoch): once another process has
  taken the response over, the write fails with ``FencedError`` and nothing is written — the
  loop stops there, without further tool calls or a terminal write;
- carries the events of the response's :class:`gateway.engine.live.LiveStream` not yet stored
  (``events=(first_sequence, [bytes])``), in the same transaction: the stream's durable log
  costs no round trip of its own while steps are written. Events emitted between writes (a
  model call's deltas) are flushed by :meth:`ResponseWriter.flush` after ``flush_s`` seconds
  (a follower on another replica sees them within about ``flush_s`` + its wake-up latency).
  With stored-first (the log's events reach clients only once stored) the first events
  pending after a step write are flushed at once: a model call's first delta gets a small
  write of its own that runs when the model call yields after that delta, while the rest of a
  burst that arrived at once is staged behind it and goes with the next write (a write waiting
  for the lock carries it: no flush is scheduled then). Later flushes start at most every
  ``flush_s``: a model streaming a token every few milliseconds costs a store write (a commit,
  on PostgreSQL a round trip and a NOTIFY) per ``flush_s``, not per token, and its clients
  get its tokens in bursts at most ``flush_s`` apart. Delayed flushes fall due on multiples of
  ``flush_s`` of the loop's clock, so those of concurrent streams share a SQLite transaction;
- retries with backoff while the database is unreachable (``StoreUnavailableError``): the loop
  pauses at its next write and goes on when the database is back, or stops with
  ``FencedError`` if another replica has taken the response over meanwhile. A retried write
  is applied once even when the connection broke while its COMMIT was in flight (stored, but
  never acknowledged): new steps carry ids made before the first attempt and an attempt's
  error an id, so the retry conflicts (or, for an attempt, is a no-op) instead of writing them
  again; a retry that conflicts, or finds its step already moved, checks that the earlier
  attempt is what the store holds (the steps by id, the step in the target state, its events
  byte-identical at their sequence numbers, the response's ``completed_at``) and returns that.

One event-carrying write is in flight at a time, so the log is appended in sequence order.
Reads pass through unchanged (retried the same way while the database is unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from store.types import (
    CANCELED,
    COMPLETED,
    FAILED,
    PROCESSING,
    Fence,
    FencedError,
    StepStateError,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
    new_id,
)

from .live import LiveStream
from .store_retry import retry_unavailable

logger = logging.getLogger("stepchain.writer")

__all__ = ["ResponseWriter"]

_T = TypeVar("_T")
# Deletions of responses whose creation may have committed unacknowledged (kept referenced).
_DISCARDING: set[asyncio.Task[None]] = set()

_STEP_WRITES = frozenset({"mark_processing", "complete_step", "fail_step", "cancel_step"})
# The state each step transition moves its step to (how a retry recognises its own commit).
_TARGETS = {
    "mark_processing": PROCESSING, "complete_step": COMPLETED, "fail_step": FAILED,
    "cancel_step": CANCELED,
}  # fmt: skip
_READS = ("list_chain", "list_steps", "get_step", "get_response", "list_events")


class ResponseWriter:
    """The store for one response's loop: fenced, event-carrying, retried writes."""

    def __init__(
        self,
        store: Any,
        response_id: str,
        fence: Fence | None,
        log: LiveStream | None = None,
        *,
        flush_s: float = 0.04,
        retry_max_s: float = 2.0,
    ) -> None:
        self.store = store
        self.response_id = response_id
        self.fence = fence
        self.log = log
        self.flush_s = flush_s
        # Events that wait for the store before any client sees them: the first pending ones
        # after a step write are stored at once, later ones flush_s after the last flush.
        self.stored_first = log is not None and log.stored_first
        self._last_flush = float("-inf")  # loop time the last flush write started
        self.retry_max_s = retry_max_s
        self.fenced = False  # set once a write was refused: this process no longer owns it
        self._lock = asyncio.Lock()  # one event-carrying write at a time
        self._queued = 0  # writes waiting for the lock (they carry what a flush would)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        if log is not None:
            log.on_pending = self._schedule_flush

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name in _READS:
            return lambda *args, **kwargs: self._retry(lambda: attr(*args, **kwargs))
        return attr

    # -- writes ----------------------------------------------------------------------------------

    async def create_response(self, *args: Any, **kwargs: Any) -> Any:
        """Not retried: a new response the store cannot take fails at once (HTTP 503). If the
        connection broke while its COMMIT was in flight it may be stored all the same, leased
        to this live process that will never run it: it is deleted in the background once the
        store answers again (its client was told it failed, and never saw its id)."""
        try:
            return await self._write("create_response", args, kwargs, retry=False)
        except StoreUnavailableError:
            record = args[0] if args else kwargs["response"]
            task = asyncio.ensure_future(self._discard(record.id))
            _DISCARDING.add(task)
            task.add_done_callback(_DISCARDING.discard)
            raise

    async def _discard(self, response_id: str, give_up_s: float = 600.0) -> None:
        try:
            deleted = await retry_unavailable(
                lambda: self.store.delete_response(response_id), max_delay_s=self.retry_max_s,
                until=asyncio.get_running_loop().time() + give_up_s,
            )  # fmt: skip
        except StoreError as exc:
            logger.error("response %s may be stored unacknowledged: %s", response_id, exc)
            return
        if deleted:
            logger.warning("response %s: its creation had committed unacknowledged; "
                           "deleted (its client got a 503)", response_id)  # fmt: skip

    async def record_steps(self, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`store.base.Store.record_steps`, with the steps' ids made here (once, not
        per attempt) so that a retry cannot write the steps twice."""
        if kwargs.get("ids") is None:
            descriptors = args[3] if len(args) > 3 else kwargs["descriptors"]
            kwargs["ids"] = [new_id("step") for _ in descriptors]
        return await self._write("record_steps", args, kwargs)

    async def mark_processing(self, *args: Any, **kwargs: Any) -> Any:
        return await self._write("mark_processing", args, kwargs)

    async def complete_step(self, *args: Any, **kwargs: Any) -> Any:
        return await self._write("complete_step", args, kwargs)

    async def fail_step(self, *args: Any, **kwargs: Any) -> Any:
        return await self._write("fail_step", args, kwargs)

    async def cancel_step(self, *args: Any, **kwargs: Any) -> Any:
        return await self._write("cancel_step", args, kwargs)

    async def record_attempt(self, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`store.base.Store.record_attempt`; the error gets an ``id`` (once, not per
        attempt) so that a retry does not append it twice."""
        error = args[1] if len(args) > 1 else kwargs.get("error")
        if isinstance(error, dict) and "id" not in error:
            error = {**error, "id": new_id("attempt")}
            if len(args) > 1:
                args = (args[0], error, *args[2:])
            else:
                kwargs["error"] = error
        return await self._write("record_attempt", args, kwargs)

    async def update_response(self, *args: Any, **kwargs: Any) -> Any:
        return await self._write("update_response", args, kwargs)

    async def _write(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, retry: bool = True
    ) -> Any:
        method = getattr(self.store, name)
        if self.fence is not None and name != "create_response":
            kwargs["fence"] = self.fence
        log = self.log
        # Carry the pending events if no other write carries some now; a write that must
        # publish staged events (the final one) waits for its turn.
        if log is None or (self._lock.locked() and not log.holding) or log.pending() is None:
            return await self._retry(
                lambda: method(*args, **kwargs), retry=retry,
                committed=lambda: self._committed(name, args, kwargs),
            )  # fmt: skip
        self._queued += 1
        try:
            await self._lock.acquire()
        finally:
            self._queued -= 1
        try:
            batch = log.pending()
            if batch is None:
                return await self._retry(
                    lambda: method(*args, **kwargs), retry=retry,
                    committed=lambda: self._committed(name, args, kwargs),
                )  # fmt: skip
            first, events = batch
            kwargs = {**kwargs, "events": (first, events)}
            self._last_flush = float("-inf")  # the next model call's first delta goes at once
            result = await self._retry(
                lambda: method(*args, **kwargs), retry=retry,
                committed=lambda: self._committed(name, args, kwargs),
            )  # fmt: skip
            log.committed(first, len(events))
        finally:
            self._lock.release()
        if log.flushable_pending() is not None:  # emitted while this write was in flight
            self._schedule_flush()
        return result

    async def _retry(
        self,
        call: Callable[[], Awaitable[_T]],
        *,
        retry: bool = True,
        committed: Callable[[], Awaitable[tuple[bool, Any]]] | None = None,
    ) -> _T:
        """``call()``, again with backoff while the store is unavailable. After such a failure
        a retry refused as a duplicate (StoreConflictError) or as a wrong step state asks
        ``committed()`` whether the failed attempt was stored after all (its COMMIT reached
        the database, its answer did not): then that attempt's result is returned."""
        if not retry:
            return await call()
        failed = False

        def waiting(exc: StoreUnavailableError) -> None:
            nonlocal failed
            failed = True
            logger.warning("response %s waits for the store: %s", self.response_id, exc)

        try:
            return await retry_unavailable(call, max_delay_s=self.retry_max_s, on_wait=waiting)
        except FencedError:
            self.fenced = True
            raise
        except (StepStateError, StoreConflictError):
            if failed and committed is not None:
                done, result = await self._retry(committed)
                if done:
                    logger.info("response %s: a retried write had committed", self.response_id)
                    return result  # type: ignore[no-any-return]
            raise

    async def _committed(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        """Whether the write ``name(*args, **kwargs)`` is in the store already, and its result."""
        store = self.store
        events = kwargs.get("events")
        if events is not None and events[1]:
            first, data = events
            stored = await store.list_events(self.response_id, after=first - 1, limit=len(data))
            if stored != [(first + i, event) for i, event in enumerate(data)]:
                return False, None
        if name == "record_steps":
            steps = [await store.get_step(step_id) for step_id in kwargs.get("ids") or ()]
            if not steps or any(s is None or s.response_id != self.response_id for s in steps):
                return False, None
            return True, steps
        if name in _TARGETS:
            step = await store.get_step(args[0])
            return (step is not None and step.state == _TARGETS[name]), step
        if name == "update_response" and (events is None or not events[1]):
            record = await store.get_response(self.response_id)
            if record is None or "completed_at" not in kwargs:
                return False, None
            same = record.completed_at == kwargs["completed_at"]
            return same and record.status == kwargs.get("status", record.status), None
        if name in ("update_response", "append_events"):
            return events is not None and bool(events[1]), None
        return False, None

    # -- flushing deltas --------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self.fenced or self._queued:
            return  # a write waiting for the lock carries the pending events
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.stored_first and now >= self._last_flush + self.flush_s:
            # Started now, the flush runs as soon as the emitting task yields (the loop yields
            # after a model call's first delta): the first delta is stored and published by one
            # small write while the rest of its burst is processed.
            self._flush_now()
        elif self._flush_handle is None:
            # At the next multiple of flush_s on the loop's clock: the flushes of all the
            # responses streaming in this process fall due together, and the SQLite worker
            # runs those it finds queued together in one transaction (one commit for all).
            tick = self.flush_s
            due = (math.floor(max(now, self._last_flush) / tick) + 1) * tick if tick > 0 else now
            self._flush_handle = loop.call_at(due, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_handle = None
        # A flush already running looks again when it ends (no polling: flush_s may be 0).
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        """Store the log's published events not yet stored (``append_events``), unless another
        write carries them; errors are left to the next write."""
        log = self.log
        if log is None or self._lock.locked():
            return  # the write holding the lock schedules the next flush when it commits
        async with self._lock:
            batch = log.flushable_pending()
            if batch is None:
                return
            first, events = batch
            self._last_flush = asyncio.get_running_loop().time()
            try:
                await self._retry(
                    lambda: self.store.append_events(
                        self.response_id, first, events, fence=self.fence
                    ),
                    committed=lambda: self._committed(
                        "append_events", (), {"events": (first, events)}
                    ),
                )
            except StoreError as exc:
                logger.warning("events of response %s not stored yet: %s", self.response_id, exc)
                return
            log.committed(first, len(events))
        if log.flushable_pending() is not None:  # emitted while this flush was in flight
            self._schedule_flush()

    async def close(self) -> None:
        """Stop flushing (the response's last write carried its remaining events)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        task = self._flush_task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, StoreError):
                pass
        if self.log is not None:
            self.log.on_pending = None

