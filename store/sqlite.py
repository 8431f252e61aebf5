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
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from .base import Store
from .migrations import apply_migrations
from .sqlite_ops import (
    _SYNCHRONOUS_MODES,
    MIN_SQLITE_VERSION,
    _cancel_step,
    _check_kinds,
    _check_response_fields,
    _claim_responses,
    _complete_step,
    _create_response,
    _create_tool,
    _delete_response,
    _delete_tool,
    _fail_step,
    _get_response,
    _get_step,
    _get_tool,
    _list_chain,
    _list_responses,
    _list_responses_page,
    _list_steps,
    _list_tools,
    _list_unfinished_steps,
    _mark_processing,
    _record_attempt,
    _record_steps_txn,
    _replace_tool,
    _set_leases,
    _translate_errors,
    _update_response,
    run_group,
)
from .types import ResponseRecord, Step, StepDescriptor, StoreError, new_id
from .worker import BatchingWorker

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")


class SQLiteStore(Store):
    """:class:`store.base.Store` on one SQLite file (WAL mode).

    ``path`` is the database file (created if missing). ``synchronous`` is SQLite's
    ``PRAGMA synchronous``: ``"NORMAL"`` (default; durable in WAL except for the last
    transactions on power loss), ``"FULL"``, ``"EXTRA"`` or ``"OFF"``; another value raises
    ValueError. Call :meth:`open` before use and :meth:`close` after; a method called while
    the store is not open raises StoreError.

    Returned objects own the payloads passed in (no copies are made).
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL") -> None:
        mode = synchronous.upper()
        if mode not in _SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        self.path = os.fspath(path)
        self._synchronous = mode
        self._executor: BatchingWorker | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread

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
        return None if conn is None else run_group(conn, calls)

    def _on_worker(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        conn = self._conn
        if conn is None:
            raise StoreError("the SQLite store is not open")
        with _translate_errors():
            return fn(conn, *args)

    def _connect(self) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; the store needs 3.35 or later"
            )
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {self.path}: {exc.strerror}") from exc
        with _translate_errors():
            # Made on the worker thread and kept check_same_thread=True, so any use from
            # another thread (the event loop) raises instead of silently blocking it.
            conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=256)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute("PRAGMA foreign_keys = ON")
                apply_migrations(sqlite_utils.Database(conn, execute_plugins=False))
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with _translate_errors():
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
        try:
            await executor.submit(self._disconnect)
        finally:
            await asyncio.to_thread(executor.shutdown)

    # -- responses ---------------------------------------------------------------------------

    async def create_response(
        self,
        response: ResponseRecord,
        *,
        owner: str | None = None,
        lease_s: float | None = None,
        first_steps: Sequence[StepDescriptor] = (),
    ) -> list[Step]:
        _check_kinds(first_steps)
        expires = None if owner is None or lease_s is None else time.time() + lease_s
        ids = [new_id("step") for _ in first_steps]
        return await self._run(_create_response, response, owner, expires, first_steps, ids)

    async def claim_responses(
        self, owner: str, lease_s: float, *, limit: int = 100
    ) -> list[ResponseRecord]:
        return await self._run(_claim_responses, owner, lease_s, limit)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        return await self._run(_set_leases, owner, time.time() + lease_s)

    async def release_leases(self, owner: str) -> int:
        return await self._run(_set_leases, owner, None)

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        return await self._run(_get_response, response_id)

    async def update_response(self, response_id: str, **fields: Any) -> None:
        _check_response_fields(fields)
        await self._run(_update_response, response_id, fields)

    async def delete_response(self, response_id: str) -> bool:
        return await self._run(_delete_response, response_id)

    async def list_responses(self, statuses: Sequence[str]) -> list[ResponseRecord]:
        if not statuses:
            return []
        return await self._run(_list_responses, tuple(statuses))

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
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be from 1 to 1000")
        return await self._run(
            _list_responses_page, tenant, all_tenants, status, model, search, after, limit
        )

    # -- steps -------------------------------------------------------------------------------

    async def record_steps(
        self,
        response_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptors: Sequence[StepDescriptor],
        *,
        start: bool = False,
    ) -> list[Step]:
        """See :meth:`Store.record_steps`. The first step of a response gets sequence 1.

        Raises ValueError for a descriptor whose kind is not ``model_call``/``tool_call``.
        """
        _check_kinds(descriptors)
        # Ids are made here, on the loop thread: new_id's tie-breaking counter is not
        # thread-safe, and other code makes ids on this thread.
        ids = [new_id("step") for _ in descriptors]
        return await self._run(
            _record_steps_txn, response_id, scope_parent, prev_step_id, descriptors, ids, start
        )

    async def mark_processing(self, step_id: str) -> Step:
        return await self._run(_mark_processing, step_id)

    async def complete_step(
        self,
        step_id: str,
        response_payload: Any,
        usage: dict[str, Any] | None = None,
        *,
        upstream: str | None = None,
        response_update: dict[str, Any] | None = None,
    ) -> Step:
        if response_update is not None:
            _check_response_fields(response_update)
        return await self._run(
            _complete_step, step_id, response_payload, usage, upstream, response_update
        )

    async def fail_step(
        self, step_id: str, error: dict[str, Any], response_payload: Any = None
    ) -> Step:
        return await self._run(_fail_step, step_id, error, response_payload)

    async def cancel_step(self, step_id: str) -> Step:
        return await self._run(_cancel_step, step_id)

    async def record_attempt(
        self, step_id: str, error: dict[str, Any] | None, upstream: str | None = None
    ) -> None:
        """See :meth:`Store.record_attempt`; ``upstream=None`` keeps the recorded upstream.

        Raises StoreNotFoundError for an unknown step.
        """
        await self._run(_record_attempt, step_id, error, upstream)

    async def get_step(self, step_id: str) -> Step | None:
        return await self._run(_get_step, step_id)

    async def list_chain(self, response_id: str, scope_parent: str | None = None) -> list[Step]:
        return await self._run(_list_chain, response_id, scope_parent)

    async def list_steps(self, response_id: str) -> list[Step]:
        return await self._run(_list_steps, response_id)

    async def list_unfinished_steps(self) -> list[Step]:
        """See :meth:`Store.list_unfinished_steps`; ordered by ``created_at``, then sequence."""
        return await self._run(_list_unfinished_steps)

    # -- tools -------------------------------------------------------------------------------

    async def create_tool(self, tool: dict[str, Any]) -> None:
        """See :meth:`Store.create_tool`; ValueError if ``tool`` has no string ``name``."""
        name = tool.get("name")
        if not isinstance(name, str):
            raise ValueError("a tool definition needs a string 'name'")
        await self._run(_create_tool, name, tool)

    async def replace_tool(self, name: str, tool: dict[str, Any]) -> None:
        """See :meth:`Store.replace_tool`; ValueError if ``tool["name"]`` differs from ``name``."""
        if tool.get("name", name) != name:
            raise ValueError(f"tool name {tool.get('name')!r} does not match {name!r}")
        await self._run(_replace_tool, name, tool)

    async def get_tool(self, name: str) -> dict[str, Any] | None:
        return await self._run(_get_tool, name)

    async def list_tools(self) -> list[dict[str, Any]]:
        return await self._run(_list_tools)

    async def delete_tool(self, name: str) -> bool:
        return await self._run(_delete_tool, name)
