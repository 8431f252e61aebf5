"""The SQL of the SQLite backend: statements, row <-> record conversion, transactions, error
translation, and the worker-thread bodies :class:`store.sqlite.SQLiteStore` runs (each
``(conn, *args)``, at most one transaction). Nothing here touches the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson

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
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
)

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
    if conn.in_transaction:
        # Inside a group (``run_group``): its savepoint around this call makes it atomic.
        yield
        return
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


def run_group(
    conn: sqlite3.Connection, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]
) -> list[tuple[bool, Any]] | None:
    """Run ``calls`` (``fn(*args)`` each, ``fn`` using ``conn``) in one transaction, each inside
    its own savepoint: a call that raises is rolled back alone and gets its exception, the others
    commit together. Returns one ``(ok, result or exception)`` per call, after the COMMIT; or
    ``None`` if the transaction as a whole could not be run or committed (everything rolled back:
    the caller then runs the calls one by one, as if never grouped)."""
    outcomes: list[tuple[bool, Any]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for fn, args in calls:
            conn.execute("SAVEPOINT call")
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to that call's caller
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
                outcomes.append((False, exc))
            else:
                conn.execute("RELEASE call")
                outcomes.append((True, result))
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return None
    return outcomes


@contextmanager
def _translate_errors() -> Iterator[None]:
    """The one boundary where foreign errors become :class:`StoreError` subclasses."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", None) in _UNIQUE_ERRORS:
            raise StoreConflictError(f"already exists: {exc}") from exc
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
        return StoreNotFoundError(f"step {step_id!r} not found")
    return StepStateError(f"step {step_id!r} is {row[0]!r}; cannot move it to {target!r}")


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
        raise StoreNotFoundError(f"response {response_id!r} not found")
    names = sorted(fields)  # stable SQL text, so the statement cache is hit
    values = [_dumps_opt(fields[n]) if n in _RESPONSE_JSON_FIELDS else fields[n] for n in names]
    sql = "UPDATE responses SET {} WHERE id = ?".format(", ".join(f"{n} = ?" for n in names))
    if conn.execute(sql, (*values, response_id)).rowcount == 0:
        raise StoreNotFoundError(f"response {response_id!r} not found")


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


def _list_responses_page(
    conn: sqlite3.Connection,
    tenant: str | None,
    all_tenants: bool,
    status: str | None,
    model: str | None,
    search: str | None,
    after: str | None,
    limit: int,
) -> tuple[list[ResponseRecord], bool]:
    where: list[str] = []
    params: list[Any] = []
    if not all_tenants:
        where.append("tenant IS ?")
        params.append(tenant)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if search:
        where.append("instr(id, ?) > 0")
        params.append(search)
    if after is not None:
        row = conn.execute("SELECT created_at FROM responses WHERE id = ?", (after,)).fetchone()
        if row is None:
            raise StoreNotFoundError(f"response {after!r} not found")
        where.append("(created_at < ? OR (created_at = ? AND id < ?))")
        params += [row[0], row[0], after]
    sql = _RESPONSE_SELECT + (" WHERE " + " AND ".join(where) if where else "")
    rows = conn.execute(
        sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    return [_response_from_row(r) for r in rows[:limit]], len(rows) > limit


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
            raise StoreNotFoundError(f"response {response_id!r} not found")
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
        raise StoreNotFoundError(f"step {step_id!r} not found")


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
        raise StoreNotFoundError(f"tool {name!r} not found")


def _get_tool(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT definition FROM tools WHERE name = ?", (name,)).fetchone()
    return None if row is None else _loads(row[0])


def _list_tools(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [_loads(row[0]) for row in conn.execute("SELECT definition FROM tools ORDER BY name")]


def _delete_tool(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("DELETE FROM tools WHERE name = ?", (name,)).rowcount > 0
