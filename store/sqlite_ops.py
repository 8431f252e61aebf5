"""The SQL of the SQLite backend: statements, row <-> record conversion, and the worker-thread
bodies :class:`store.sqlite.SQLiteStore` runs (each ``(conn, *args)``, at most one transaction,
:mod:`store.sqlite_tx`). Nothing here touches the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from .event_log import SQLITE_INSERT, sqlite_append_rows, sqlite_params, sqlite_rows_params
from .sqlite_tx import transaction
from .validation import RESPONSE_JSON_FIELDS, check_fence
from .types import (
    ALLOWED_TRANSITIONS,
    CANCELED,
    COMPLETED,
    FAILED,
    PENDING,
    PROCESSING,
    STEP_STATES,
    Fence,
    FencedError,
    StoreNotFoundError,
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreError,
)

_T = TypeVar("_T")

MIN_SQLITE_VERSION = (3, 35, 0)
SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# -- rows <-> dataclasses (column order = dataclass field order) ------------------------------

STEP_COLUMNS = tuple(
    "id response_id scope_parent prev_step_id sequence kind state request_payload"
    " response_payload error attempt created_at started_at finished_at usage attempts upstream"
    .split()
)
_STEP_SELECT = "SELECT " + ", ".join(STEP_COLUMNS) + " FROM steps"

RESPONSE_COLUMNS = tuple(
    "id model request tenant status previous_response_id created_at completed_at output usage"
    " error incomplete_details metadata store owner owner_epoch cancel_requested".split()
)
RESPONSE_SELECT = "SELECT " + ", ".join(RESPONSE_COLUMNS) + " FROM responses"
_RESPONSE_INSERT_LEASED = "INSERT INTO responses ({}, lease_expires_at) VALUES ({})".format(
    ", ".join(RESPONSE_COLUMNS), ", ".join("?" * (len(RESPONSE_COLUMNS) + 1))
)
Events = tuple[int, Sequence[bytes]] | None
Items = tuple[str, Sequence[dict[str, Any]]] | None

_loads = orjson.loads

# CPython's sqlite3 binds int, float, str and bytearray parameters directly, but sends None and
# bytes through its adaptation protocol: a failed adapter lookup, a failed ``__adapt__`` lookup
# that formats and clears an AttributeError, and a ``__conform__`` lookup — thousands of
# instructions per parameter, and most statements here bind several NULLs (and the event log
# binds bytes). Identity adapters (a C callable each, same bound values) make that one dict hit.
sqlite3.register_adapter(type(None), {}.get)  # {}.get(None) is None: bound as NULL
sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b: bound as a BLOB


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _dumps_opt(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads_opt(text: str | None) -> Any:
    return None if text is None else _loads(text)


def step_from_row(row: tuple[Any, ...]) -> Step:
    (id_, response_id, scope_parent, prev_step_id, sequence, kind, state, request_payload,
     response_payload, error, attempt, created_at, started_at, finished_at, usage, attempts,
     upstream) = row  # fmt: skip
    return Step(
        id_, response_id, scope_parent, prev_step_id, sequence, kind, state,
        _loads(request_payload), _loads_opt(response_payload), _loads_opt(error), attempt,
        created_at, started_at, finished_at, _loads_opt(usage), _loads(attempts), upstream,
    )  # fmt: skip


def response_from_row(row: tuple[Any, ...]) -> ResponseRecord:
    (id_, model, request, tenant, status, previous_response_id, created_at, completed_at,
     output, usage, error, incomplete_details, metadata, store, owner, owner_epoch,
     cancel_requested) = row  # fmt: skip
    return ResponseRecord(
        id_, model, _loads(request), tenant, status, previous_response_id, created_at,
        completed_at, _loads(output), _loads_opt(usage), _loads_opt(error),
        _loads_opt(incomplete_details), _loads_opt(metadata), bool(store), owner, owner_epoch,
        bool(cancel_requested),
    )  # fmt: skip


def _response_to_row(r: ResponseRecord, owner: str | None) -> tuple[Any, ...]:
    return (
        r.id, r.model, _dumps(r.request), r.tenant, r.status, r.previous_response_id,
        r.created_at, r.completed_at, _dumps(r.output), _dumps_opt(r.usage), _dumps_opt(r.error),
        _dumps_opt(r.incomplete_details), _dumps_opt(r.metadata), int(r.store), owner, 1,
        int(r.cancel_requested),
    )  # fmt: skip


# -- state transitions: one conditional UPDATE each, built from ALLOWED_TRANSITIONS ---------


def _transition_sql(target: str, assignments: str, known: frozenset[str] = frozenset()) -> str:
    """``UPDATE … WHERE id = ? AND state IN (<states allowed to reach target>) RETURNING …``.

    Columns in ``known`` come back as NULL: the caller already holds their values, so they
    are neither copied out of SQLite nor decoded again.
    """
    sources = [s for s in STEP_STATES if target in ALLOWED_TRANSITIONS[s]]
    returning = ", ".join("NULL" if c in known else c for c in STEP_COLUMNS)
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
    ", ".join(STEP_COLUMNS[:13]), ", ".join("?" * 13)
)  # id … started_at; the rest take their defaults / NULL
_CHAIN_TOP = _STEP_SELECT + " WHERE response_id = ? AND scope_parent IS NULL ORDER BY sequence"
_CHAIN_SCOPE = _STEP_SELECT + " WHERE response_id = ? AND scope_parent = ? ORDER BY sequence"
_UNFINISHED = (
    _STEP_SELECT
    + f" WHERE state IN ('{PENDING}', '{PROCESSING}') ORDER BY created_at, response_id, sequence"
)
_RECORD_ATTEMPT = (
    "UPDATE steps SET attempts = json_insert(attempts, '$[#]', json(?)),"
    " upstream = coalesce(?, upstream) WHERE id = ? RETURNING id, response_id"
)
# An error with an id is appended once: a retried write finds it there and appends nothing.
_RECORD_ATTEMPT_ONCE = (
    "UPDATE steps SET attempts = CASE WHEN EXISTS (SELECT 1 FROM json_each(attempts)"
    " WHERE json_extract(value, '$.id') = ?) THEN attempts ELSE json_insert(attempts, '$[#]',"
    " json(?)) END, upstream = coalesce(?, upstream) WHERE id = ? RETURNING id, response_id"
)


def _state_error(conn: sqlite3.Connection, step_id: str, target: str) -> StoreError:
    """Why a conditional transition UPDATE matched no row: no such step, or a wrong state."""
    row = conn.execute("SELECT state FROM steps WHERE id = ?", (step_id,)).fetchone()
    if row is None:
        return StoreNotFoundError(f"step {step_id!r} not found")
    return StepStateError(f"step {step_id!r} is {row[0]!r}; cannot move it to {target!r}")


# -- worker-thread bodies: (conn, *args), one transaction each -------------------------------


def _write_events(conn: sqlite3.Connection, response_id: str, events: Events) -> None:
    if events and events[1]:
        conn.execute(SQLITE_INSERT, sqlite_params(response_id, *events))  # one row per write


def insert_conversation_items(
    conn: sqlite3.Connection, conversation_id: str, items: Sequence[dict[str, Any]]
) -> None:
    """Append ``items`` to the conversation (inside the caller's transaction), in order.

    StoreNotFoundError for an unknown conversation; StoreConflictError (from the unique index) for an
    item id the conversation has already."""
    row = conn.execute(
        "UPDATE conversations SET last_position = last_position + ? WHERE id = ?"
        " RETURNING last_position",
        (len(items), conversation_id),
    ).fetchall()
    if not row:
        raise StoreNotFoundError(f"conversation {conversation_id!r} not found")
    base = row[0][0] - len(items)
    conn.executemany(
        "INSERT INTO conversation_items (conversation_id, position, id, item) VALUES (?, ?, ?, ?)",
        [(conversation_id, base + n, item["id"], _dumps(item)) for n, item in enumerate(items, 1)],
    )


def create_response(
    conn: sqlite3.Connection,
    response: ResponseRecord,
    owner: str | None,
    expires: float | None,
    first_steps: Sequence[StepDescriptor],
    ids: list[str],
    events: Events = None,
) -> list[Step]:
    owner = owner if owner is not None else response.owner
    with transaction(conn):
        conn.execute(_RESPONSE_INSERT_LEASED, (*_response_to_row(response, owner), expires))
        _write_events(conn, response.id, events)
        if not first_steps:
            return []
        return _insert_steps(conn, response.id, None, None, first_steps, ids, True, 0)


_RESPONSE_UNFINISHED = "status IN ('queued', 'in_progress')"


def claim_responses(
    conn: sqlite3.Connection,
    owner: str,
    lease_s: float,
    limit: int,
    is_dead: Callable[[str], bool] | None = None,
) -> list[ResponseRecord]:
    """Take over responses whose lease ran out or that have none, and (with ``is_dead``) those
    of other owners ``is_dead(owner)`` says are gone, oldest first; bumps ``owner_epoch``."""
    now = time.time()
    with transaction(conn):
        rows = conn.execute(
            f"{RESPONSE_SELECT} WHERE {_RESPONSE_UNFINISHED} AND (lease_expires_at IS NULL "
            "OR lease_expires_at < ?) ORDER BY created_at, id LIMIT ?",
            (now, limit),
        ).fetchall()
        if is_dead is not None and len(rows) < limit:
            others = conn.execute(
                f"SELECT DISTINCT owner FROM responses WHERE {_RESPONSE_UNFINISHED}"
                " AND lease_expires_at >= ? AND owner IS NOT NULL AND owner != ?",
                (now, owner),
            ).fetchall()
            dead = [o for (o,) in others if is_dead(o)]
            if dead:
                rows += conn.execute(
                    f"{RESPONSE_SELECT} WHERE {_RESPONSE_UNFINISHED} AND lease_expires_at >= ?"
                    f" AND owner IN ({', '.join('?' * len(dead))}) ORDER BY created_at, id LIMIT ?",
                    (now, *dead, limit - len(rows)),
                ).fetchall()
                rows.sort(key=lambda row: (row[6], row[0]))  # created_at, id
        conn.executemany(
            "UPDATE responses SET owner = ?, owner_epoch = owner_epoch + 1, lease_expires_at = ?"
            " WHERE id = ?",
            [(owner, now + lease_s, row[0]) for row in rows],
        )
    records = [response_from_row(row) for row in rows]
    for record in records:
        record.owner, record.owner_epoch = owner, record.owner_epoch + 1
    return records


def set_leases(conn: sqlite3.Connection, owner: str, expires: float | None) -> int:
    return conn.execute(
        f"UPDATE responses SET lease_expires_at = ? WHERE owner = ? AND {_RESPONSE_UNFINISHED}",
        (expires, owner),
    ).rowcount


def get_response(conn: sqlite3.Connection, response_id: str) -> ResponseRecord | None:
    row = conn.execute(RESPONSE_SELECT + " WHERE id = ?", (response_id,)).fetchone()
    return None if row is None else response_from_row(row)


def _update_fields(conn: sqlite3.Connection, response_id: str, fields: dict[str, Any]) -> None:
    if not fields:
        if conn.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone():
            return
        raise StoreNotFoundError(f"response {response_id!r} not found")
    names = sorted(fields)  # stable SQL text, so the statement cache is hit
    values = [_dumps_opt(fields[n]) if n in RESPONSE_JSON_FIELDS else fields[n] for n in names]
    sql = "UPDATE responses SET {} WHERE id = ?".format(", ".join(f"{n} = ?" for n in names))
    if conn.execute(sql, (*values, response_id)).rowcount == 0:
        raise StoreNotFoundError(f"response {response_id!r} not found")


def _fence_response(conn: sqlite3.Connection, response_id: str, fence: Fence | None) -> None:
    row = conn.execute(
        "SELECT owner, owner_epoch FROM responses WHERE id = ?", (response_id,)
    ).fetchone()
    check_fence(fence, f"response {response_id!r}", row)


def update_response(
    conn: sqlite3.Connection,
    response_id: str,
    fields: dict[str, Any],
    fence: Fence | None = None,
    events: Events = None,
    items: Items = None,
) -> None:
    if fence is None and not events and items is None:
        _update_fields(conn, response_id, fields)
        return
    with transaction(conn):
        _fence_response(conn, response_id, fence)
        _update_fields(conn, response_id, fields)
        _write_events(conn, response_id, events)
        if items is not None:
            insert_conversation_items(conn, *items)


_APPEND = SQLITE_INSERT.replace("VALUES (", "SELECT ", 1)[:-1] + " FROM responses WHERE id = ?"
_APPEND_FENCED = _APPEND + " AND owner = ? AND owner_epoch = ?"


def append_events(
    conn: sqlite3.Connection, response_id: str, events: Events, fence: Fence | None
) -> None:
    """One statement (its own transaction): the batch, inserted only if the response exists and
    the fence holds — a model call's first delta costs no BEGIN, COMMIT or fence read of its own."""
    if not (events and events[1]):
        _fence_response(conn, response_id, fence)
        return
    params = sqlite_params(response_id, *events)
    if fence is None:
        inserted = conn.execute(_APPEND, (*params, response_id)).rowcount
    else:
        inserted = conn.execute(_APPEND_FENCED, (*params, response_id, fence.owner, fence.epoch)).rowcount
    if not inserted:
        _fence_response(conn, response_id, fence)  # StoreNotFoundError / FencedError
        raise FencedError(f"response {response_id!r}: fence is stale")  # changed in between


#: Rows per multi-row append: at most this many statement texts (one per row count) take places
#: in the connection's statement cache (``cached_statements=256``), however large groups get.
ROWS_PER_STATEMENT = 32


class _NotAllAppended(StoreError):
    """An append of :func:`append_events_together` would not insert: the group is rolled back
    (never reaches a caller: the appends are then run one by one)."""


def append_events_together(
    conn: sqlite3.Connection, appends: Sequence[tuple[str, Events, Fence | None]]
) -> None:
    """The :func:`append_events` calls of one group (``(response_id, events, fence)`` each, all
    with events, all of different responses) as one statement per :data:`ROWS_PER_STATEMENT`
    inside the group's transaction: the per-call statement, Python frames and result of the
    others are saved. Raises :class:`_NotAllAppended` (or the ``sqlite3`` error, e.g. an
    overlap's UNIQUE) if any batch would not be inserted; the caller
    (:func:`store.sqlite_tx.run_group`) then rolls back and the appends are run one by one, each
    with its own exact error."""
    for start in range(0, len(appends), ROWS_PER_STATEMENT):
        chunk = appends[start : start + ROWS_PER_STATEMENT]
        params: list[object] = []
        for response_id, events, fence in chunk:
            owner, epoch = (None, None) if fence is None else (fence.owner, fence.epoch)
            params += sqlite_rows_params(response_id, *events, owner, epoch)  # type: ignore[misc]
        if conn.execute(sqlite_append_rows(len(chunk)), params).rowcount != len(chunk):
            raise _NotAllAppended


def delete_response(conn: sqlite3.Connection, response_id: str) -> bool:
    with transaction(conn):
        conn.execute("DELETE FROM steps WHERE response_id = ?", (response_id,))
        conn.execute("DELETE FROM event_batches WHERE response_id = ?", (response_id,))
        deleted = conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
    return deleted > 0


def list_responses(conn: sqlite3.Connection, statuses: tuple[str, ...]) -> list[ResponseRecord]:
    sql = "{} WHERE status IN ({}) ORDER BY created_at, id".format(
        RESPONSE_SELECT, ", ".join("?" * len(statuses))
    )
    return [response_from_row(row) for row in conn.execute(sql, statuses)]


def record_steps(
    conn: sqlite3.Connection,
    response_id: str,
    scope_parent: str | None,
    prev_step_id: str | None,
    descriptors: Sequence[StepDescriptor],
    ids: list[str],
    start: bool,
    fence: Fence | None = None,
    events: Events = None,
) -> list[Step]:
    with transaction(conn):
        row = conn.execute(
            "SELECT (SELECT max(sequence) FROM steps WHERE response_id = ?), owner, owner_epoch"
            " FROM responses WHERE id = ?",
            (response_id, response_id),
        ).fetchone()
        check_fence(fence, f"response {response_id!r}", row)
        _write_events(conn, response_id, events)
        return _insert_steps(
            conn, response_id, scope_parent, prev_step_id, descriptors, ids, start, row[0] or 0
        )


def _insert_steps(
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


_FENCE_BY_STEP = (
    "SELECT r.owner, r.owner_epoch FROM steps s JOIN responses r ON r.id = s.response_id"
    " WHERE s.id = ?"
)


def _transition(
    conn: sqlite3.Connection,
    sql: str,
    params: tuple[Any, ...],
    step_id: str,
    target: str | None,
    fence: Fence | None = None,
    events: Events = None,
    after: Callable[[str], None] | None = None,
) -> tuple[Any, ...]:
    """Run one step UPDATE … RETURNING (``target``: the state it moves to, None for an update
    that is no transition) with its fence check, events and ``after(response_id)`` in one
    transaction."""
    with transaction(conn):
        if fence is not None:
            check_fence(fence, f"step {step_id!r}", conn.execute(_FENCE_BY_STEP, (step_id,)).fetchone())
        rows = conn.execute(sql, params).fetchall()  # fetchall: finish the statement
        if not rows:
            if target is None:
                raise StoreNotFoundError(f"step {step_id!r} not found")
            raise _state_error(conn, step_id, target)
        row = rows[0]
        _write_events(conn, row[1], events)  # row[1]: the step's response_id
        if after is not None:
            after(row[1])
    return row


def mark_processing(
    conn: sqlite3.Connection, step_id: str, fence: Fence | None = None, events: Events = None
) -> Step:
    return step_from_row(
        _transition(conn, _MARK_PROCESSING, (time.time(), step_id), step_id, PROCESSING, fence, events)
    )


def complete_step(
    conn: sqlite3.Connection,
    step_id: str,
    response_payload: Any,
    usage: dict[str, Any] | None,
    upstream: str | None,
    response_update: dict[str, Any] | None,
    fence: Fence | None = None,
    events: Events = None,
    items: Items = None,
) -> Step:
    params = (_dumps_opt(response_payload), _dumps_opt(usage), time.time(), upstream, step_id)

    def after(response_id: str) -> None:
        if response_update is not None:
            _update_fields(conn, response_id, response_update)
        if items is not None:
            insert_conversation_items(conn, *items)

    row = _transition(conn, _COMPLETE, params, step_id, COMPLETED, fence, events, after)
    step = step_from_row(row)
    step.response_payload, step.usage = response_payload, usage
    return step


def fail_step(
    conn: sqlite3.Connection,
    step_id: str,
    error: dict[str, Any],
    response_payload: Any,
    fence: Fence | None = None,
    events: Events = None,
) -> Step:
    params = (_dumps(error), _dumps_opt(response_payload), time.time(), step_id)
    step = step_from_row(_transition(conn, _FAIL, params, step_id, FAILED, fence, events))
    step.error, step.response_payload = error, response_payload
    return step


def cancel_step(
    conn: sqlite3.Connection, step_id: str, fence: Fence | None = None, events: Events = None
) -> Step:
    return step_from_row(
        _transition(conn, _CANCEL, (time.time(), step_id), step_id, CANCELED, fence, events)
    )


def record_attempt(
    conn: sqlite3.Connection,
    step_id: str,
    error: dict[str, Any] | None,
    upstream: str | None,
    fence: Fence | None = None,
    events: Events = None,
) -> str:
    """Returns the step's response id."""
    if error is None:
        sql = "UPDATE steps SET upstream = coalesce(?, upstream) WHERE id = ? RETURNING id, response_id"
        params: tuple[Any, ...] = (upstream, step_id)
    else:
        sql, params = _RECORD_ATTEMPT, (_dumps(error), upstream, step_id)
        if isinstance(error.get("id"), str):
            sql, params = _RECORD_ATTEMPT_ONCE, (error["id"], *params)
    return _transition(conn, sql, params, step_id, None, fence, events)[1]


def get_step(conn: sqlite3.Connection, step_id: str) -> Step | None:
    row = conn.execute(_STEP_SELECT + " WHERE id = ?", (step_id,)).fetchone()
    return None if row is None else step_from_row(row)


def list_chain(conn: sqlite3.Connection, response_id: str, scope_parent: str | None) -> list[Step]:
    if scope_parent is None:
        cursor = conn.execute(_CHAIN_TOP, (response_id,))
    else:
        cursor = conn.execute(_CHAIN_SCOPE, (response_id, scope_parent))
    return [step_from_row(row) for row in cursor]


def list_steps(conn: sqlite3.Connection, response_id: str) -> list[Step]:
    cursor = conn.execute(_STEP_SELECT + " WHERE response_id = ? ORDER BY sequence", (response_id,))
    return [step_from_row(row) for row in cursor]


def list_unfinished_steps(conn: sqlite3.Connection) -> list[Step]:
    return [step_from_row(row) for row in conn.execute(_UNFINISHED)]
