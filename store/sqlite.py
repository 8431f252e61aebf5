"""The SQLite backend of the step-chain store: the embedded default for one process.

One dedicated worker thread (:class:`store.worker.BatchingWorker`) owns the one connection;
every store method is one hop to that thread doing all its SQL in at most one transaction, so
the event loop never blocks on SQLite and writes are serialised in submission order. The file
runs in WAL mode, so other processes may read it while this one writes.

The SQL itself — prepared statements, row <-> record conversion, the worker-thread bodies — is
in :mod:`store.sqlite_ops`; sqlite-utils only creates the schema, through the migrations in
:mod:`store.migrations`, applied by :meth:`SQLiteStore.open`. ``sqlite3.Error`` is translated
to :class:`store.types.StoreError` in one place. Requires SQLite 3.35 or later (``RETURNING``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlite_utils

from .base import Store
from .migrations import apply_migrations
from . import sqlite_ops as ops
from . import sqlite_records as records
from . import sqlite_tx as tx
from .notify import Waiters, wait_until
from .owners import OwnerLocks
from .validation import (
    check_conversation_items,
    check_events,
    check_kinds,
    check_page,
    check_response_fields,
    check_step_ids,
)
from .types import (
    StoreConflictError,
    ConversationRecord,
    Fence,
    ResponseRecord,
    Step,
    StepDescriptor,
    StoreError,
    new_id,
)
from .worker import BatchingWorker

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

# sqlite3 binds None, bool and bytes only after looking for an adapter, and that failed look-up
# builds and drops an AttributeError per parameter (~13 per response). These adapters bind each
# exactly as before (NULL, 0/1, BLOB), without it. sqlite3's adapters are process-wide.
sqlite3.register_adapter(type(None), {}.get)
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(bytes, bytes)

#: Each waiter also re-checks on its own this often, whatever the shared poller does.
_FALLBACK_POLL_S = 5.0
#: How long the shared poller goes on without waiters before it stops (woken ones re-arm).
_POLLER_LINGER_S = 1.0


class SQLiteStore(Store):
    """:class:`store.base.Store` on one SQLite file (WAL mode).

    ``path`` is the database file (created if missing). ``synchronous`` is SQLite's
    ``PRAGMA synchronous``: ``"NORMAL"`` (default; durable in WAL except for the last
    transactions on power loss), ``"FULL"``, ``"EXTRA"`` or ``"OFF"``; another value raises
    ValueError. Call :meth:`open` before use and :meth:`close` after; a method called while
    the store is not open raises StoreError.

    ``poll_s`` (10 ms) and ``cancel_poll_s`` (250 ms) are how often :meth:`wait_events` and
    :meth:`wait_cancel` look for other processes' writes on the same file (this store's own
    writes wake them at once): one shared poller per store, running while someone waits (and a
    second after),
    one ``PRAGMA data_version`` per tick and a query only when another process committed. Owner liveness uses lock files in ``<path>-owners/``
    (:mod:`store.owners`).

    Returned objects own the payloads passed in (no copies are made).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        poll_s: float = 0.01,
        cancel_poll_s: float = 0.25,
    ) -> None:
        mode = synchronous.upper()
        if mode not in ops.SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {sorted(ops.SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        self.path = os.fspath(path)
        self._synchronous = mode
        self._executor: BatchingWorker | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._poll_s, self._cancel_poll_s = poll_s, cancel_poll_s
        self._waiters = Waiters()
        self._poller: asyncio.Task[None] | None = None
        # The connection's PRAGMA data_version as the poller last read it (first: at connect).
        # Kept here, not in the poller: a poller started again (it stops while nobody waits)
        # must compare with what was last seen, or a commit made before its first read goes
        # unnoticed, and its followers sleep until their fallback re-check (seconds).
        self._data_version: int | None = None
        self._owners = OwnerLocks(self.path)

    def __repr__(self) -> str:
        state = "open" if self._executor is not None else "closed"
        return f"<SQLiteStore {self.path!r} {state}>"

    # -- the worker hop ----------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(conn, *args)`` on the worker thread; errors come back as StoreError."""
        executor = self._executor
        if executor is None:
            raise StoreError("the SQLite store is not open")
        return await executor.submit_grouped(self._on_worker, fn, args)

    def _group_on_worker(
        self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]] | None:
        # Store calls queued together share one transaction (``run_group``): one commit.
        conn = self._conn
        if conn is None:
            return None
        appends = _appends_together(calls)
        if appends is not None:  # concurrent streams' flushes, due on the same tick
            done = tx.run_group(conn, [(ops.append_events_together, (conn, appends))])
            return None if done is None else [(True, None)] * len(appends)
        return tx.run_group(conn, calls)

    def _on_worker(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        conn = self._conn
        if conn is None:
            raise StoreError("the SQLite store is not open")
        try:
            return fn(conn, *args)
        except tx.FOREIGN_ERRORS as exc:  # as tx.translate_errors, without a generator
            raise tx.translated(exc) from exc

    def _connect(self) -> None:
        if sqlite3.sqlite_version_info < ops.MIN_SQLITE_VERSION:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; the store needs 3.35 or later"
            )
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {self.path}: {exc.strerror}") from exc
        with tx.translate_errors():
            # Made on the worker thread and kept check_same_thread=True, so any use from
            # another thread (the event loop) raises instead of silently blocking it.
            conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=256)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute("PRAGMA foreign_keys = ON")
                apply_migrations(sqlite_utils.Database(conn, execute_plugins=False))
                self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with tx.translate_errors():
                try:
                    conn.execute("PRAGMA optimize")
                finally:
                    conn.close()

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the worker thread, connect, set the pragmas and apply pending migrations."""
        if self._executor is not None:
            return
        executor = BatchingWorker("stepchain-sqlite", group=self._group_on_worker)
        self._executor = executor
        try:
            await executor.submit(self._connect)
        except BaseException:
            self._executor = None
            await asyncio.to_thread(executor.shutdown)
            raise

    async def close(self) -> None:
        """Close the connection on the worker thread (after queued calls) and stop the thread."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        self._waiters.wake_all()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
            self._poller = None
        await asyncio.to_thread(self._owners.release_all)
        try:
            await executor.submit(self._disconnect)
        finally:
            await asyncio.to_thread(executor.shutdown)

    # -- responses ---------------------------------------------------------------------------

    def _changed(self, response_id: str, events: Any, status_set: bool = False) -> None:
        """After a commit: wake this process's followers of ``response_id``."""
        if (events and events[1]) or status_set:
            self._waiters.notify("events", response_id)

    async def create_response(
        self,
        response: ResponseRecord,
        *,
        owner: str | None = None,
        lease_s: float | None = None,
        first_steps: Sequence[StepDescriptor] = (),
        events: tuple[int, Sequence[bytes]] | None = None,
        fence: Fence | None = None,
    ) -> list[Step]:
        check_kinds(first_steps)
        check_events(events)
        expires = None if owner is None or lease_s is None else time.time() + lease_s
        ids = [new_id("step") for _ in first_steps]
        steps = await self._run(ops.create_response, response, owner, expires, first_steps, ids, events)
        self._changed(response.id, events)
        return steps

    async def claim_responses(
        self, owner: str, lease_s: float, *, limit: int = 100
    ) -> list[ResponseRecord]:
        return await self._run(ops.claim_responses, owner, lease_s, limit, self._owners.is_dead)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        return await self._run(ops.set_leases, owner, time.time() + lease_s)

    async def release_leases(self, owner: str) -> int:
        return await self._run(ops.set_leases, owner, None)

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        return await self._run(ops.get_response, response_id)

    async def update_response(
        self,
        response_id: str,
        *,
        fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
        conversation_items: tuple[str, Sequence[dict[str, Any]]] | None = None,
        **fields: Any,
    ) -> None:
        check_response_fields(fields)
        check_events(events)
        if conversation_items is not None:
            check_conversation_items(conversation_items[1])
        await self._run(ops.update_response, response_id, fields, fence, events, conversation_items)
        self._changed(response_id, events, "status" in fields)

    async def delete_response(self, response_id: str) -> bool:
        return await self._run(ops.delete_response, response_id)

    async def list_responses(self, statuses: Sequence[str]) -> list[ResponseRecord]:
        if not statuses:
            return []
        return await self._run(ops.list_responses, tuple(statuses))

    # -- steps -------------------------------------------------------------------------------

    async def record_steps(
        self,
        response_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptors: Sequence[StepDescriptor],
        *,
        start: bool = False,
        fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Step]:
        """See :meth:`Store.record_steps`. The first step of a response gets sequence 1.

        Raises ValueError for a descriptor whose kind is not ``model_call``/``tool_call``.
        """
        check_kinds(descriptors)
        check_events(events)
        # Ids are made here, on the loop thread: new_id's tie-breaking counter is not
        # thread-safe, and other code makes ids on this thread.
        given = check_step_ids(ids, descriptors)
        ids = given if given is not None else [new_id("step") for _ in descriptors]
        steps = await self._run(
            ops.record_steps, response_id, scope_parent, prev_step_id, descriptors, ids, start,
            fence, events,
        )  # fmt: skip
        self._changed(response_id, events)
        return steps

    async def mark_processing(
        self, step_id: str, *, fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> Step:  # fmt: skip
        check_events(events)
        step = await self._run(ops.mark_processing, step_id, fence, events)
        self._changed(step.response_id, events)
        return step

    async def complete_step(
        self,
        step_id: str,
        response_payload: Any,
        usage: dict[str, Any] | None = None,
        *,
        upstream: str | None = None,
        response_update: dict[str, Any] | None = None,
        fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
        conversation_items: tuple[str, Sequence[dict[str, Any]]] | None = None,
    ) -> Step:
        if response_update is not None:
            check_response_fields(response_update)
        check_events(events)
        if conversation_items is not None:
            check_conversation_items(conversation_items[1])
        step = await self._run(
            ops.complete_step, step_id, response_payload, usage, upstream, response_update,
            fence, events, conversation_items,
        )  # fmt: skip
        self._changed(step.response_id, events, bool(response_update and "status" in response_update))
        return step

    async def fail_step(
        self,
        step_id: str,
        error: dict[str, Any],
        response_payload: Any = None,
        *,
        fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> Step:
        check_events(events)
        step = await self._run(ops.fail_step, step_id, error, response_payload, fence, events)
        self._changed(step.response_id, events)
        return step

    async def cancel_step(
        self, step_id: str, *, fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> Step:  # fmt: skip
        check_events(events)
        step = await self._run(ops.cancel_step, step_id, fence, events)
        self._changed(step.response_id, events)
        return step

    async def record_attempt(
        self,
        step_id: str,
        error: dict[str, Any] | None,
        upstream: str | None = None,
        *,
        fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> None:
        """See :meth:`Store.record_attempt`; ``upstream=None`` keeps the recorded upstream.

        Raises StoreNotFoundError for an unknown step.
        """
        check_events(events)
        response_id = await self._run(ops.record_attempt, step_id, error, upstream, fence, events)
        self._changed(response_id, events)

    async def get_step(self, step_id: str) -> Step | None:
        return await self._run(ops.get_step, step_id)

    async def list_chain(self, response_id: str, scope_parent: str | None = None) -> list[Step]:
        return await self._run(ops.list_chain, response_id, scope_parent)

    async def list_steps(self, response_id: str) -> list[Step]:
        return await self._run(ops.list_steps, response_id)

    async def list_unfinished_steps(self) -> list[Step]:
        """See :meth:`Store.list_unfinished_steps`; ordered by ``created_at``, then sequence."""
        return await self._run(ops.list_unfinished_steps)

    # -- tools -------------------------------------------------------------------------------

    async def create_tool(self, tool: dict[str, Any]) -> None:
        """See :meth:`Store.create_tool`; ValueError if ``tool`` has no string ``name``."""
        name = tool.get("name")
        if not isinstance(name, str):
            raise ValueError("a tool definition needs a string 'name'")
        await self._run(records.create_tool, name, tool)

    async def replace_tool(self, name: str, tool: dict[str, Any]) -> None:
        """See :meth:`Store.replace_tool`; ValueError if ``tool["name"]`` differs from ``name``."""
        if tool.get("name", name) != name:
            raise ValueError(f"tool name {tool.get('name')!r} does not match {name!r}")
        await self._run(records.replace_tool, name, tool)

    async def get_tool(self, name: str) -> dict[str, Any] | None:
        return await self._run(records.get_tool, name)

    async def list_tools(self) -> list[dict[str, Any]]:
        return await self._run(records.list_tools)

    async def delete_tool(self, name: str) -> bool:
        return await self._run(records.delete_tool, name)

    # -- the durable event log ---------------------------------------------------------------

    async def append_events(
        self,
        response_id: str,
        first_sequence: int,
        events: Sequence[bytes],
        *,
        fence: Fence | None = None,
    ) -> None:
        check_events((first_sequence, events))
        if not events:
            return
        await self._run(ops.append_events, response_id, (first_sequence, events), fence)
        self._waiters.notify("events", response_id)

    async def list_events(
        self, response_id: str, *, after: int = -1, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        return await self._run(records.list_events, response_id, after, limit)

    async def wait_events(self, response_id: str, after: int, timeout_s: float) -> None:
        """See :meth:`Store.wait_events`. Writes of this store wake waiters at once; writes of
        other processes on the same file are seen by a poll every ``poll_s`` (10 ms)."""
        self._ensure_poller()
        await wait_until(
            self._waiters, "events", response_id,
            lambda: self._run(records.events_ready, response_id, after),
            timeout_s, lambda: _FALLBACK_POLL_S,
        )  # fmt: skip

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll_other_processes())

    async def _poll_other_processes(self) -> None:
        """While anyone waits: every ``poll_s``, one ``PRAGMA data_version`` (it changes when
        another connection committed); on a change, wake the event followers (each re-checks)
        and, every ``cancel_poll_s``, look up which watched responses have a cancel request —
        one query for all of them. Cost with nothing happening elsewhere: one pragma per tick.

        It stops once nobody has waited for :data:`_POLLER_LINGER_S` (1 s). Waking a follower
        takes it off the waiters until it re-arms, a few loop turns later: a poller that
        stopped at the first tick without waiters would leave a follower woken by another
        response's commit (finding nothing, it re-arms) without wake-ups until its fallback
        re-check, 5 s. A follower that comes back after the poller stopped starts a new one
        (:meth:`wait_events`), which compares with the version last seen, so that what was
        committed meanwhile wakes its followers at the new poller's first tick."""
        last_cancel_check, dirty = 0.0, True
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            await asyncio.sleep(self._poll_s)
            executor = self._executor
            if executor is None:
                return
            now = loop.time()
            if not self._waiters:
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= _POLLER_LINGER_S:
                    return
                continue
            idle_since = None
            watched: list[str] = []
            if dirty and now - last_cancel_check >= self._cancel_poll_s:
                watched = self._waiters.keys("cancel")
            try:
                version, changed, cancelled = await executor.submit(
                    self._on_worker, records.poll_changes, (self._data_version, watched)
                )
            except (StoreError, RuntimeError):
                continue
            self._data_version = version
            if watched:
                last_cancel_check, dirty = now, False
            dirty = dirty or changed
            if changed:
                self._waiters.notify_channel("events")
            for response_id in cancelled:
                self._waiters.notify("cancel", response_id)

    # -- liveness and cancellation -----------------------------------------------------------

    async def register_owner(self, owner: str) -> None:
        """See :meth:`Store.register_owner`: an ``flock`` on ``<db>-owners/…`` (:mod:`store.owners`)."""
        try:
            taken = await asyncio.to_thread(self._owners.register, owner)
        except OSError as exc:
            raise StoreError(f"cannot register owner {owner!r}: {exc.strerror}") from None
        if not taken:
            raise StoreConflictError(f"owner {owner!r} is registered by a live process")

    async def release_owner(self, owner: str) -> None:
        await asyncio.to_thread(self._owners.release, owner)

    async def request_cancel(self, response_id: str) -> bool:
        found = await self._run(records.request_cancel, response_id)
        if found:
            self._waiters.notify("cancel", response_id)
        return found

    async def wait_cancel(self, response_id: str, timeout_s: float | None = None) -> bool:
        """See :meth:`Store.wait_cancel`. Requests made through this store wake it at once;
        those of other processes are seen by a poll every ``cancel_poll_s`` (250 ms)."""
        self._ensure_poller()
        return await wait_until(
            self._waiters, "cancel", response_id,
            lambda: self._run(records.cancel_requested, response_id),
            timeout_s, lambda: _FALLBACK_POLL_S,
        )  # fmt: skip

    # -- conversations -----------------------------------------------------------------------

    async def create_conversation(
        self, conversation: ConversationRecord, items: Sequence[dict[str, Any]] = ()
    ) -> None:
        check_conversation_items(items)
        await self._run(records.create_conversation, conversation, list(items))

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        return await self._run(records.get_conversation, conversation_id)

    async def update_conversation(
        self, conversation_id: str, metadata: dict[str, Any]
    ) -> ConversationRecord:
        return await self._run(records.update_conversation, conversation_id, metadata)

    async def delete_conversation(self, conversation_id: str) -> bool:
        return await self._run(records.delete_conversation, conversation_id)

    async def add_conversation_items(
        self, conversation_id: str, items: Sequence[dict[str, Any]]
    ) -> None:
        check_conversation_items(items)
        await self._run(records.add_conversation_items, conversation_id, list(items))

    async def list_conversation_items(
        self,
        conversation_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: str = "desc",
    ) -> tuple[list[dict[str, Any]], bool]:
        check_page(limit, order)
        return await self._run(records.list_conversation_items, conversation_id, after, limit, order)

    async def get_conversation_item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        return await self._run(records.get_conversation_item, conversation_id, item_id)

    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        return await self._run(records.delete_conversation_item, conversation_id, item_id)

    # -- listing and retention ---------------------------------------------------------------

    async def list_responses_page(
        self,
        *,
        tenant: str | None = None,
        all_tenants: bool = False,
        status: str | None = None,
        model: str | None = None,
        search: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> tuple[list[ResponseRecord], bool]:
        check_page(limit)
        return await self._run(
            records.list_responses_page, tenant, all_tenants, status, model, search, after, limit
        )

    async def purge_before(self, timestamp: float) -> int:
        return await self._run(records.purge_before, timestamp)


def _appends_together(
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]],
) -> list[tuple[str, Any, Fence | None]] | None:
    """The ``(response_id, events, fence)`` of each call when every call of a group is an
    :func:`ops.append_events` with events, each of a different response; else None (the group
    runs call by call in one transaction)."""
    appends = []
    for _on_worker, (fn, args) in calls:
        if fn is not ops.append_events or not args[1][1]:
            return None
        appends.append(args)
    if len({args[0] for args in appends}) != len(appends):
        return None  # one statement cannot check a batch against another of the same response
    return appends
