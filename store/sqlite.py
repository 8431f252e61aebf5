"""The SQLite backend of the step-chain store: the embedded default for one process.

One dedicated worker thread owns the one connection; every store method is one hop to that
thread (``loop.run_in_executor``) doing all its SQL in at most one transaction, so the event
loop never blocks on SQLite and writes are serialised in submission order. The file runs in
WAL mode, so other processes may read it while this one writes.

Hot-path writes are prepared plain SQL (the connection caches the statements); sqlite-utils
only creates the schema, through the migrations in :mod:`store.migrations`, applied by
:meth:`SQLiteStore.open`. ``sqlite3.Error`` is translated to :class:`store.types.StoreError`
in one place (:func:`_translate_errors`). Requires SQLite 3.35 or later (``RETURNING``).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson
import sqlite_utils

from .base import Store
from .migrations import apply_migrations
from .types import (
    ALLOWED_TRANSITIONS,
    CANCELED,
    COMPLETED,
    FAILED,
    MODEL_CALL,
    PENDING,
    PROCESSING,
    STEP_STATES,
    TOOL_CALL,
    ConflictError,
    NotFoundError,
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreError,
    new_id,
)
from .worker import BatchingWorker

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

MIN_SQLITE_VERSION = (3, 35, 0)
_SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_UNIQUE_ERRORS = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})

# -- rows <-> dataclasses (column order = dataclass field order) ------------------------------

_STEP_COLUMNS = tuple(
    "id response_id scope_parent prev_step_id sequence kind state request_payload"
    " response_payload error attempt created_at started_at finished_at usage attempts upstream"
    .split()
)
_STEP_SELECT = "SELECT " + ", ".join(_STEP_COLUMNS) + " FROM steps"

_RESPONSE_COLUMNS = tuple(
    "id model request tenant status previous_response_id created_at completed_at output usage"
    " error incomplete_details metadata store".split()
)
_RESPONSE_SELECT = "SELECT " + ", ".join(_RESPONSE_COLUMNS) + " FROM responses"
_RESPONSE_INSERT_LEASED = "INSERT INTO responses ({}, owner, lease_expires_at) VALUES ({})".format(
    ", ".join(_RESPONSE_COLUMNS), ", ".join("?" * (len(_RESPONSE_COLUMNS) + 2))
)
_RESPONSE_JSON_FIELDS = frozenset({"output", "usage", "error", "incomplete_details", "metadata"})
_RESPONSE_UPDATABLE = _RESPONSE_JSON_FIELDS | {"status", "completed_at"}

_loads = orjson.loads


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _dumps_opt(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads_opt(text: str | None) -> Any:
    return None if text is None else _loads(text)


def _step_from_row(row: tuple[Any, ...]) -> Step:
    (id_, response_id, scope_parent, prev_step_id, sequence, kind, state, request_payload,
     response_payload, error, attempt, created_at, started_at, finished_at, usage, attempts,
     upstream) = row  # fmt: skip
    return Step(
        id_, response_id, scope_parent, prev_step_id, sequence, kind, state,
        _loads(request_payload), _loads_opt(response_payload), _loads_opt(error), attempt,
        created_at, started_at, finished_at, _loads_opt(usage), _loads(attempts), upstream,
    )  # fmt: skip


def _response_from_row(row: tuple[Any, ...]) -> ResponseRecord:
    (id_, model, request, tenant, status, previous_response_id, created_at, completed_at,
     output, usage, error, incomplete_details, metadata, store) = row  # fmt: skip
    return ResponseRecord(
        id_, model, _loads(request), tenant, status, previous_response_id, created_at,
        completed_at, _loads(output), _loads_opt(usage), _loads_opt(error),
        _loads_opt(incomplete_details), _loads_opt(metadata), bool(store),
    )  # fmt: skip


def _response_to_row(r: ResponseRecord) -> tuple[Any, ...]:
    return (
        r.id, r.model, _dumps(r.request), r.tenant, r.status, r.previous_response_id,
        r.created_at, r.completed_at, _dumps(r.output), _dumps_opt(r.usage), _dumps_opt(r.error),
        _dumps_opt(r.incomplete_details), _dumps_opt(r.metadata), int(r.store),
    )  # fmt: skip


# -- state transitions: one conditional UPDATE each, built from ALLOWED_TRANSITIONS ---------


def _transition_sql(target: str, assignments: str, known: frozenset[str] = frozenset()) -> str:
    """``UPDATE … WHERE id = ? AND state IN (<states allowed to reach target>) RETURNING …``.

    Columns in ``known`` come back as NULL: the caller already holds their values, so they
    are neither copied out of SQLite nor decoded again.
    """
    sources = [s for s in STEP_STATES if target in ALLOWED_TRANSITIONS[s]]
    returning = ", ".join("NULL" if c in known else c for c in _STEP_COLUMNS)
    return (
        f"UPDATE steps SET state = '{target}', {assignments} WHERE id = ? AND state IN "
        f"({', '.join(repr(s) for s in sources)}) RETURNING {returning}"
    )


_MARK_PROCESSING = _transition_sql(PROCESSING, "started_at = ?, attempt = attempt + 1")
_COMPLETE = _transition_sql(
    COMPLETED,
    "response_payload = ?, usage = ?, finished_at = ?, upstream = coalesce(?, upstream)",
    frozenset({"response_payload", "usage"}),
)
_FAIL = _transition_sql(
    FAILED,
    "error = ?, response_payload = ?, finished_at = ?",
    frozenset({"error", "response_payload"}),
)
_CANCEL = _transition_sql(CANCELED, "finished_at = ?")

_STEP_INSERT = "INSERT INTO steps ({}) VALUES ({})".format(
    ", ".join(_STEP_COLUMNS[:13]), ", ".join("?" * 13)
)  # id … started_at; the rest take their defaults / NULL
_CHAIN_TOP = _STEP_SELECT + " WHERE response_id = ? AND scope_parent IS NULL ORDER BY sequence"
_CHAIN_SCOPE = _STEP_SELECT + " WHERE response_id = ? AND scope_parent = ? ORDER BY sequence"
_UNFINISHED = (
    _STEP_SELECT
    + f" WHERE state IN ('{PENDING}', '{PROCESSING}') ORDER BY created_at, response_id, sequence"
)
_RECORD_ATTEMPT = (
    "UPDATE steps SET attempts = json_insert(attempts, '$[#]', json(?)),"
    " upstream = coalesce(?, upstream) WHERE id = ?"
)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a read-then-write transaction can't then fail
    # to upgrade because another process wrote in between (busy_timeout covers the wait).
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def _translate_errors() -> Iterator[None]:
    """The one boundary where foreign errors become :class:`StoreError` subclasses."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", None) in _UNIQUE_ERRORS:
            raise ConflictError(f"already exists: {exc}") from exc
        raise StoreError(f"sqlite integrity error: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite error: {exc}") from exc
    except orjson.JSONEncodeError as exc:
        raise StoreError(f"value is not JSON-serialisable: {exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"corrupt JSON column: {exc}") from exc


def _state_error(conn: sqlite3.Connection, step_id: str, target: str) -> StoreError:
    """Why a conditional transition UPDATE matched no row: no such step, or a wrong state."""
    row = conn.execute("SELECT state FROM steps WHERE id = ?", (step_id,)).fetchone()
    if row is None:
        return NotFoundError(f"step {step_id!r} not found")
    return StepStateError(f"step {step_id!r} is {row[0]!r}; cannot move it to {target!r}")


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
        return await executor.submit(self._on_worker, fn, args)

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
        executor = BatchingWorker("stepchain-sqlite")
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

        Raises NotFoundError for an unknown step.
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


# -- worker-thread bodies: (conn, *args), one transaction each -------------------------------


def _check_response_fields(fields: dict[str, Any]) -> None:
    unknown = fields.keys() - _RESPONSE_UPDATABLE
    if unknown:
        raise ValueError(
            f"cannot update response field(s) {sorted(unknown)}; "
            f"allowed: {sorted(_RESPONSE_UPDATABLE)}"
        )


def _check_kinds(descriptors: Sequence[StepDescriptor]) -> None:
    for d in descriptors:
        if d.kind not in (MODEL_CALL, TOOL_CALL):
            raise ValueError(f"unknown step kind {d.kind!r}")


def _create_response(
    conn: sqlite3.Connection,
    response: ResponseRecord,
    owner: str | None,
    expires: float | None,
    first_steps: Sequence[StepDescriptor],
    ids: list[str],
) -> list[Step]:
    with _transaction(conn):
        conn.execute(_RESPONSE_INSERT_LEASED, (*_response_to_row(response), owner, expires))
        if not first_steps:
            return []
        return _record_steps(conn, response.id, None, None, first_steps, ids, True, 0)


_RESPONSE_UNFINISHED = "status IN ('queued', 'in_progress')"


def _claim_responses(
    conn: sqlite3.Connection, owner: str, lease_s: float, limit: int
) -> list[ResponseRecord]:
    now = time.time()
    with _transaction(conn):
        rows = conn.execute(
            f"{_RESPONSE_SELECT} WHERE {_RESPONSE_UNFINISHED} AND (lease_expires_at IS NULL "
            "OR lease_expires_at < ?) ORDER BY created_at, id LIMIT ?",
            (now, limit),
        ).fetchall()
        conn.executemany(
            "UPDATE responses SET owner = ?, lease_expires_at = ? WHERE id = ?",
            [(owner, now + lease_s, row[0]) for row in rows],
        )
    return [_response_from_row(row) for row in rows]


def _set_leases(conn: sqlite3.Connection, owner: str, expires: float | None) -> int:
    return conn.execute(
        f"UPDATE responses SET lease_expires_at = ? WHERE owner = ? AND {_RESPONSE_UNFINISHED}",
        (expires, owner),
    ).rowcount


def _get_response(conn: sqlite3.Connection, response_id: str) -> ResponseRecord | None:
    row = conn.execute(_RESPONSE_SELECT + " WHERE id = ?", (response_id,)).fetchone()
    return None if row is None else _response_from_row(row)


def _update_response(conn: sqlite3.Connection, response_id: str, fields: dict[str, Any]) -> None:
    if not fields:
        if conn.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone():
            return
        raise NotFoundError(f"response {response_id!r} not found")
    names = sorted(fields)  # stable SQL text, so the statement cache is hit
    values = [_dumps_opt(fields[n]) if n in _RESPONSE_JSON_FIELDS else fields[n] for n in names]
    sql = "UPDATE responses SET {} WHERE id = ?".format(", ".join(f"{n} = ?" for n in names))
    if conn.execute(sql, (*values, response_id)).rowcount == 0:
        raise NotFoundError(f"response {response_id!r} not found")


def _delete_response(conn: sqlite3.Connection, response_id: str) -> bool:
    with _transaction(conn):
        conn.execute("DELETE FROM steps WHERE response_id = ?", (response_id,))
        deleted = conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
    return deleted > 0


def _list_responses(conn: sqlite3.Connection, statuses: tuple[str, ...]) -> list[ResponseRecord]:
    sql = "{} WHERE status IN ({}) ORDER BY created_at, id".format(
        _RESPONSE_SELECT, ", ".join("?" * len(statuses))
    )
    return [_response_from_row(row) for row in conn.execute(sql, statuses)]


def _record_steps_txn(
    conn: sqlite3.Connection,
    response_id: str,
    scope_parent: str | None,
    prev_step_id: str | None,
    descriptors: Sequence[StepDescriptor],
    ids: list[str],
    start: bool,
) -> list[Step]:
    with _transaction(conn):
        exists, last = conn.execute(
            "SELECT EXISTS(SELECT 1 FROM responses WHERE id = ?),"
            " (SELECT max(sequence) FROM steps WHERE response_id = ?)",
            (response_id, response_id),
        ).fetchone()
        if not exists:
            raise NotFoundError(f"response {response_id!r} not found")
        return _record_steps(
            conn, response_id, scope_parent, prev_step_id, descriptors, ids, start, last or 0
        )


def _record_steps(
    conn: sqlite3.Connection,
    response_id: str,
    scope_parent: str | None,
    prev_step_id: str | None,
    descriptors: Sequence[StepDescriptor],
    ids: list[str],
    start: bool,
    last_sequence: int,
) -> list[Step]:
    """Insert the steps (inside the caller's transaction), chained, after ``last_sequence``."""
    now = time.time()
    state, attempt, started = (PROCESSING, 1, now) if start else (PENDING, 0, None)
    steps: list[Step] = []
    rows: list[tuple[Any, ...]] = []
    prev, sequence = prev_step_id, last_sequence
    for step_id, d in zip(ids, descriptors):
        sequence += 1
        rows.append(
            (step_id, response_id, scope_parent, prev, sequence, d.kind, state,
             _dumps(d.request_payload), None, None, attempt, now, started)
        )  # fmt: skip
        steps.append(
            Step(step_id, response_id, scope_parent, prev, sequence, d.kind, state,
                 d.request_payload, attempt=attempt, created_at=now, started_at=started)
        )  # fmt: skip
        prev = step_id
    conn.executemany(_STEP_INSERT, rows)
    return steps


def _transition(
    conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], step_id: str, target: str
) -> tuple[Any, ...]:
    with _transaction(conn):
        row = conn.execute(sql, params).fetchall()  # fetchall: finish the statement
        if not row:
            raise _state_error(conn, step_id, target)
    return row[0]


def _mark_processing(conn: sqlite3.Connection, step_id: str) -> Step:
    return _step_from_row(
        _transition(conn, _MARK_PROCESSING, (time.time(), step_id), step_id, PROCESSING)
    )


def _complete_step(
    conn: sqlite3.Connection,
    step_id: str,
    response_payload: Any,
    usage: dict[str, Any] | None,
    upstream: str | None,
    response_update: dict[str, Any] | None,
) -> Step:
    params = (_dumps_opt(response_payload), _dumps_opt(usage), time.time(), upstream, step_id)
    if response_update is None:
        row = _transition(conn, _COMPLETE, params, step_id, COMPLETED)
    else:
        with _transaction(conn):
            rows = conn.execute(_COMPLETE, params).fetchall()
            if not rows:
                raise _state_error(conn, step_id, COMPLETED)
            row = rows[0]
            _update_response(conn, row[1], response_update)  # row[1]: the step's response_id
    step = _step_from_row(row)
    step.response_payload, step.usage = response_payload, usage
    return step


def _fail_step(
    conn: sqlite3.Connection, step_id: str, error: dict[str, Any], response_payload: Any
) -> Step:
    params = (_dumps(error), _dumps_opt(response_payload), time.time(), step_id)
    step = _step_from_row(_transition(conn, _FAIL, params, step_id, FAILED))
    step.error, step.response_payload = error, response_payload
    return step


def _cancel_step(conn: sqlite3.Connection, step_id: str) -> Step:
    return _step_from_row(_transition(conn, _CANCEL, (time.time(), step_id), step_id, CANCELED))


def _record_attempt(
    conn: sqlite3.Connection, step_id: str, error: dict[str, Any] | None, upstream: str | None
) -> None:
    if error is None:
        sql, params = "UPDATE steps SET upstream = coalesce(?, upstream) WHERE id = ?", (upstream, step_id)
    else:
        sql, params = _RECORD_ATTEMPT, (_dumps(error), upstream, step_id)
    if conn.execute(sql, params).rowcount == 0:
        raise NotFoundError(f"step {step_id!r} not found")


def _get_step(conn: sqlite3.Connection, step_id: str) -> Step | None:
    row = conn.execute(_STEP_SELECT + " WHERE id = ?", (step_id,)).fetchone()
    return None if row is None else _step_from_row(row)


def _list_chain(conn: sqlite3.Connection, response_id: str, scope_parent: str | None) -> list[Step]:
    if scope_parent is None:
        cursor = conn.execute(_CHAIN_TOP, (response_id,))
    else:
        cursor = conn.execute(_CHAIN_SCOPE, (response_id, scope_parent))
    return [_step_from_row(row) for row in cursor]


def _list_steps(conn: sqlite3.Connection, response_id: str) -> list[Step]:
    cursor = conn.execute(_STEP_SELECT + " WHERE response_id = ? ORDER BY sequence", (response_id,))
    return [_step_from_row(row) for row in cursor]


def _list_unfinished_steps(conn: sqlite3.Connection) -> list[Step]:
    return [_step_from_row(row) for row in conn.execute(_UNFINISHED)]


def _create_tool(conn: sqlite3.Connection, name: str, tool: dict[str, Any]) -> None:
    now = time.time()
    conn.execute(
        "INSERT INTO tools (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?)",
        (name, _dumps(tool), now, now),
    )


def _replace_tool(conn: sqlite3.Connection, name: str, tool: dict[str, Any]) -> None:
    cursor = conn.execute(
        "UPDATE tools SET definition = ?, updated_at = ? WHERE name = ?",
        (_dumps(tool), time.time(), name),
    )
    if cursor.rowcount == 0:
        raise NotFoundError(f"tool {name!r} not found")


def _get_tool(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT definition FROM tools WHERE name = ?", (name,)).fetchone()
    return None if row is None else _loads(row[0])


def _list_tools(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [_loads(row[0]) for row in conn.execute("SELECT definition FROM tools ORDER BY name")]


def _delete_tool(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("DELETE FROM tools WHERE name = ?", (name,)).rowcount > 0
