"""The SQL of the PostgreSQL backend: statements, row <-> record conversion, and the bodies
:class:`store.postgres.PostgresStore` runs, each ``(conn, *args)`` on one pooled connection in
autocommit mode, at most one transaction.

Multi-statement writes run in psycopg's pipeline mode inside one transaction: the statements go
out together (one round trip, plus the COMMIT), and a check that fails after them (a stale fence,
an illegal transition) raises, which rolls the whole transaction back. Fences are checked in the
same transaction, against a row lock on the response (``FOR SHARE``, or the UPDATE's own lock).

A write that stores events or changes a response's status wakes ``wait_events`` callers on every
replica with ``pg_notify('stepchain_events', response_id)``, in its own transaction, but only
when the response is followed: ``responses.followed``, set by a follower before its first
readiness check (:meth:`store.postgres_records.PostgresRecords.wait_events`) and read here under
the write's row lock on the response. Nobody follows most responses, and each NOTIFY is echoed
to every replica's listener. No event is missed (READ COMMITTED): a write that locks the row
after the follower's UPDATE committed reads ``followed = true`` (a row changed since the
statement's snapshot is re-read at its newest version once locked); a write that locked it
first makes the follower's UPDATE wait for its commit, and the follower's readiness check,
which comes after that UPDATE, sees its events. A write that does not lock the response (an
unfenced step write) NOTIFYs unconditionally.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg

from .event_log import postgres_insert, postgres_named, postgres_params
from .validation import check_conversation_items, check_fence
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

Conn = psycopg.AsyncConnection[Any]
Events = tuple[int, Sequence[bytes]] | None
Items = tuple[str, Sequence[dict[str, Any]]] | None



class StoreConnection(psycopg.AsyncConnection[Any]):
    """A connection of the store's pool (``connection_class``) that keeps one cursor for the
    single statements whose result is read at once (:func:`run`): a new cursor per statement
    (``conn.execute``) costs ~30–50 µs of CPU (its adapters map and transformer), as much as
    the rest of the client side of a round trip."""

    _kept: psycopg.AsyncCursor[Any] | None = None
    #: Whether this session holds the single append's statement (store.postgres_appends).
    append_prepared = False

    async def run(self, query: Any, params: Any = None) -> psycopg.AsyncCursor[Any]:
        cursor = self._kept
        if cursor is None or cursor.closed:
            cursor = self._kept = self.cursor()
        return await cursor.execute(query, params)


async def run(conn: Conn, query: Any, params: Any = None) -> psycopg.AsyncCursor[Any]:
    """``conn.execute(query, params)`` on the connection's kept cursor (a StoreConnection's):
    read the result before the next statement on ``conn``. Not inside a pipeline."""
    if isinstance(conn, StoreConnection):
        return await conn.run(query, params)
    return await conn.execute(query, params)


EVENTS_CHANNEL = "stepchain_events"
CANCEL_CHANNEL = "stepchain_cancel"

STEP_COLUMNS = tuple(
    "id response_id scope_parent prev_step_id sequence kind state request_payload"
    " response_payload error attempt created_at started_at finished_at usage attempts upstream"
    .split()
)
RESPONSE_COLUMNS = tuple(
    "id model request tenant status previous_response_id created_at completed_at output usage"
    " error incomplete_details metadata store owner owner_epoch cancel_requested".split()
)
_STEP_SELECT = "SELECT " + ", ".join(STEP_COLUMNS) + " FROM steps"
_STEP_RETURNING = ", ".join(STEP_COLUMNS)
_STEP_WIDTH = len(STEP_COLUMNS)
RESPONSE_SELECT = "SELECT " + ", ".join(RESPONSE_COLUMNS) + " FROM responses"
_RESPONSE_RETURNING = ", ".join(f"r.{c}" for c in RESPONSE_COLUMNS)
_RESPONSE_INSERT = "INSERT INTO responses ({}, lease_expires_at, last_sequence) VALUES ({})".format(
    ", ".join(RESPONSE_COLUMNS), ", ".join(["%s"] * (len(RESPONSE_COLUMNS) + 2))
)
RESPONSE_JSON_FIELDS = frozenset({"output", "usage", "error", "incomplete_details", "metadata"})
UNFINISHED = "status IN ('queued', 'in_progress')"


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def dumps_opt(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def step_from_row(row: Sequence[Any]) -> Step:
    return Step(*row)  # column order = field order; json columns come back decoded


def response_from_row(row: Sequence[Any]) -> ResponseRecord:
    record = ResponseRecord(*row)
    if record.output is None:
        record.output = []
    return record


def _response_params(r: ResponseRecord, owner: str | None, expires: float | None, last: int) -> tuple[Any, ...]:
    return (
        r.id, r.model, dumps(r.request), r.tenant, r.status, r.previous_response_id,
        r.created_at, r.completed_at, dumps(r.output), dumps_opt(r.usage), dumps_opt(r.error),
        dumps_opt(r.incomplete_details), dumps_opt(r.metadata), bool(r.store), owner, 1,
        bool(r.cancel_requested), expires, last,
    )  # fmt: skip


# -- state transitions: one conditional UPDATE each ------------------------------------------


def _transition_sql(target: str, assignments: str) -> str:
    sources = [s for s in STEP_STATES if target in ALLOWED_TRANSITIONS[s]]
    return (
        f"UPDATE steps SET state = '{target}', {assignments} WHERE id = %s AND state IN "
        f"({', '.join(repr(s) for s in sources)}) RETURNING {_STEP_RETURNING}"
    )


MARK_PROCESSING = _transition_sql(PROCESSING, "started_at = %s, attempt = attempt + 1")
COMPLETE = _transition_sql(
    COMPLETED, "response_payload = %s, usage = %s, finished_at = %s, upstream = coalesce(%s, upstream)"
)
FAIL = _transition_sql(FAILED, "error = %s, response_payload = %s, finished_at = %s")
CANCEL = _transition_sql(CANCELED, "finished_at = %s")
RECORD_ATTEMPT = (
    "UPDATE steps SET attempts = attempts || jsonb_build_array(%s::jsonb),"
    f" upstream = coalesce(%s, upstream) WHERE id = %s RETURNING {_STEP_RETURNING}"
)
# An error with an id is appended once: a retried write finds it there and appends nothing.
RECORD_ATTEMPT_ONCE = (
    "UPDATE steps SET attempts = CASE WHEN attempts @> jsonb_build_array(jsonb_build_object('id',"
    " %s::text)) THEN attempts ELSE attempts || jsonb_build_array(%s::jsonb) END,"
    f" upstream = coalesce(%s, upstream) WHERE id = %s RETURNING {_STEP_RETURNING}"
)
SET_UPSTREAM = f"UPDATE steps SET upstream = coalesce(%s, upstream) WHERE id = %s RETURNING {_STEP_RETURNING}"

# Fence reads: (id, followed, owner, owner_epoch); check_fence reads the last two.
_FENCE_BY_STEP = (
    "SELECT r.id, r.followed, r.owner, r.owner_epoch FROM steps s"
    " JOIN responses r ON r.id = s.response_id WHERE s.id = %s FOR {} OF r"
)
_FENCE_BY_STEP_SHARE = _FENCE_BY_STEP.format("SHARE")
_FENCE_BY_STEP_UPDATE = _FENCE_BY_STEP.format("NO KEY UPDATE")
_FENCE_BY_RESPONSE = "SELECT id, followed, owner, owner_epoch FROM responses WHERE id = %s FOR {}"
_FENCE_BY_RESPONSE_SHARE = _FENCE_BY_RESPONSE.format("SHARE")
# Nothing for an unknown response (the caller reports StoreNotFoundError).
_EVENTS_INSERT = postgres_insert("r.id", "responses r WHERE r.id = %s")
_EVENTS_INSERT_BY_STEP = postgres_insert("s.response_id", "steps s WHERE s.id = %s")
_NOTIFY = "SELECT pg_notify(%s, %s)"

async def state_error(conn: Conn, step_id: str, target: str) -> StoreError:
    cursor = await conn.execute("SELECT state FROM steps WHERE id = %s", (step_id,))
    row = await cursor.fetchone()
    if row is None:
        return StoreNotFoundError(f"step {step_id!r} not found")
    return StepStateError(f"step {step_id!r} is {row[0]!r}; cannot move it to {target!r}")


_STATEMENTS: dict[tuple[str, bool, bool, tuple[str, ...]], str] = {}


def _step_statement(sql: str, fenced: bool, with_events: bool, updates: tuple[str, ...] = ()) -> str:
    """``sql`` (a step UPDATE … RETURNING) as one statement with the fence check (params:
    step id, owner, epoch — first), the response's columns ``updates`` set (params: their values,
    after ``sql``'s) and the events insert (params: :func:`postgres_params` — last), with a
    NOTIFY when events or the response's status are written: fenced, only if the response is
    followed (read under the fence's lock). Returns the step's columns (and a void NOTIFY
    column)."""
    key = (sql, fenced, with_events, updates)
    statement = _STATEMENTS.get(key)
    if statement is None:
        parts = []
        if fenced:
            lock = "NO KEY UPDATE" if updates else "SHARE"
            parts.append(
                "f AS (SELECT r.followed FROM steps s JOIN responses r ON r.id = s.response_id"
                f" WHERE s.id = %s AND r.owner = %s AND r.owner_epoch = %s FOR {lock} OF r)"
            )
            sql = sql.replace(" RETURNING ", " AND EXISTS (SELECT 1 FROM f) RETURNING ", 1)
        parts.append(f"u AS ({sql})")
        if updates:
            sets = ", ".join(f"{name} = %s" for name in updates)
            parts.append(
                f"ru AS (UPDATE responses SET {sets} FROM u WHERE responses.id = u.response_id"
                " RETURNING responses.id)"
            )
        select = "SELECT u.* FROM u"
        if with_events:
            parts.append(f"e AS ({postgres_insert('u.response_id', 'u')})")
        if with_events or "status" in updates:
            notify = f"pg_notify('{EVENTS_CHANNEL}', u.response_id)"
            if fenced:  # f read the response under its lock
                select = f"SELECT u.*, CASE WHEN f.followed THEN {notify} END FROM u, f"
            else:  # no lock on the response: NOTIFY anyway
                select = f"SELECT u.*, {notify} FROM u"
        statement = _STATEMENTS[key] = "WITH " + ", ".join(parts) + " " + select
    return statement


async def _why_not(conn: Conn, step_id: str, target: str | None, fence: Fence | None) -> StoreError:
    """Why a step write matched no row: no such step, a stale fence, or a wrong state."""
    cursor = await conn.execute(
        "SELECT s.state, r.owner, r.owner_epoch FROM steps s JOIN responses r"
        " ON r.id = s.response_id WHERE s.id = %s",
        (step_id,),
    )
    row = await cursor.fetchone()
    what = f"step {step_id!r}"
    check_fence(fence, what, row)  # NotFoundError / FencedError
    assert row is not None
    if target is None:
        return StoreNotFoundError(f"{what} not found")
    return StepStateError(f"step {step_id!r} is {row[0]!r}; cannot move it to {target!r}")


async def _queue_events(conn: Conn, response_id: str, events: Events) -> None:
    if events:
        first, data = events
        if data:
            await conn.execute(_EVENTS_INSERT, (*postgres_params(first, data), response_id))


def _update_sql(fields: dict[str, Any]) -> tuple[str, list[Any]]:
    names = sorted(fields)  # stable SQL text, so prepared statements are reused
    values = [dumps_opt(fields[n]) if n in RESPONSE_JSON_FIELDS else fields[n] for n in names]
    sql = "UPDATE responses SET {} WHERE id = %s RETURNING id, followed, owner, owner_epoch".format(
        ", ".join(f"{n} = %s" for n in names)
    )
    return sql, values


async def add_items(conn: Conn, conversation_id: str, items: Sequence[dict[str, Any]]) -> None:
    """Append items (inside the caller's transaction); StoreNotFoundError for an unknown conversation."""
    ids = check_conversation_items(items)
    cursor = await conn.execute(
        "UPDATE conversations SET last_position = last_position + %s WHERE id = %s"
        " RETURNING last_position",
        (len(ids), conversation_id),
    )
    row = await cursor.fetchone()
    if row is None:
        raise StoreNotFoundError(f"conversation {conversation_id!r} not found")
    if ids:
        await conn.execute(
            "INSERT INTO conversation_items (conversation_id, position, id, item)"
            " SELECT %s, %s + t.n, t.id, t.item::json"
            " FROM unnest(%b::text[], %b::text[]) WITH ORDINALITY AS t(id, item, n)",
            (conversation_id, row[0] - len(ids), ids, [dumps(i) for i in items]),
        )


# -- bodies ----------------------------------------------------------------------------------


async def create_response(
    conn: Conn,
    response: ResponseRecord,
    owner: str | None,
    expires: float | None,
    first_steps: Sequence[StepDescriptor],
    ids: list[str],
    events: Events,
) -> list[Step]:
    """One statement (one round trip, its own transaction): the response row, its first steps
    (``processing``) and its first events, as CTEs of one INSERT."""
    owner = owner if owner is not None else response.owner
    now = time.time()
    steps: list[Step] = []
    prev = None
    for n, (step_id, d) in enumerate(zip(ids, first_steps), start=1):
        steps.append(
            Step(step_id, response.id, None, prev, n, d.kind, PROCESSING, d.request_payload,
                 attempt=1, created_at=now, started_at=now)
        )  # fmt: skip
        prev = step_id
    has_events = bool(events and events[1])
    params: list[Any] = list(_response_params(response, owner, expires, len(steps)))
    if len(steps) == 1:  # scalars: cheaper to adapt than arrays
        params += [steps[0].id, steps[0].kind, dumps(steps[0].request_payload), now, now]
    elif steps:
        params += [
            now, now, [s.id for s in steps], [s.prev_step_id for s in steps],
            [s.kind for s in steps], [dumps(s.request_payload) for s in steps],
        ]  # fmt: skip
    if has_events:
        assert events is not None
        params += postgres_params(*events)
    await run(conn, _CREATE_RESPONSE[(min(len(steps), 2), has_events)], params)
    return steps


def _create_response_sql(steps: int, with_events: bool) -> str:
    """``steps``: 0, 1 (its columns as scalars) or 2 (any number, as arrays)."""
    if not steps and not with_events:
        return _RESPONSE_INSERT
    parts = [f"r AS ({_RESPONSE_INSERT} RETURNING id)"]
    if steps == 1:
        parts.append(
            "s AS (INSERT INTO steps (id, response_id, prev_step_id, sequence, kind, state,"
            " request_payload, attempt, created_at, started_at)"
            f" SELECT %s, r.id, NULL, 1, %s, '{PROCESSING}', %s::json, 1, %s::float8, %s::float8"
            " FROM r)"
        )
    elif steps:
        parts.append(
            "s AS (INSERT INTO steps (id, response_id, prev_step_id, sequence, kind, state,"
            " request_payload, attempt, created_at, started_at)"
            f" SELECT t.id, r.id, t.prev, t.n, t.kind, '{PROCESSING}', t.payload::json, 1,"
            " %s::float8, %s::float8 FROM r, unnest(%b::text[], %b::text[], %b::text[],"
            " %b::text[]) WITH ORDINALITY AS t(id, prev, kind, payload, n))"
        )
    select = "SELECT r.id FROM r"
    if with_events:
        parts.append(f"e AS ({postgres_insert('r.id', 'r')})")
        # No NOTIFY: nobody can be waiting for the events of a response not yet created (a
        # follower learns its id from this write's answer), and the gateway's own LISTEN
        # connection would be woken by the echo of every streamed response's creation.
    return "WITH " + ", ".join(parts) + " " + select


_CREATE_RESPONSE = {(s, e): _create_response_sql(s, e) for s in (0, 1, 2) for e in (False, True)}


async def record_steps(
    conn: Conn,
    response_id: str,
    scope_parent: str | None,
    prev_step_id: str | None,
    descriptors: Sequence[StepDescriptor],
    ids: list[str],
    start: bool,
    fence: Fence | None,
    events: Events,
) -> list[Step]:
    """One statement: bump the response's ``last_sequence`` (its row lock orders concurrent
    appends; the fence is part of its WHERE), insert the steps after it, and the events."""
    now = time.time()
    state, attempt, started = (PROCESSING, 1, now) if start else (PENDING, 0, None)
    n = len(descriptors)
    prevs: list[str | None] = [prev_step_id, *ids[:-1]] if ids else []
    has_events = bool(events and events[1])
    sql = _RECORD_STEPS[(fence is not None, has_events)]
    args: dict[str, Any] = {
        "n": n, "rid": response_id, "scope": scope_parent, "state": state, "attempt": attempt,
        "now": now, "started": started, "ids": ids, "prevs": prevs,
        "kinds": [d.kind for d in descriptors],
        "payloads": [dumps(d.request_payload) for d in descriptors],
    }  # fmt: skip
    if fence is not None:
        args["owner"], args["epoch"] = fence.owner, fence.epoch
    if has_events:
        assert events is not None
        args.update(postgres_named(*events))
    cursor = await run(conn, sql, args)
    row = await cursor.fetchone()
    if row is None:
        cursor = await conn.execute(
            "SELECT owner, owner_epoch FROM responses WHERE id = %s", (response_id,)
        )
        check_fence(fence, f"response {response_id!r}", await cursor.fetchone())
        raise FencedError(f"response {response_id!r}: fence is stale")  # changed meanwhile
    last = row[0]
    return [
        Step(step_id, response_id, scope_parent, prev, last - n + i, d.kind, state,
             d.request_payload, attempt=attempt, created_at=now, started_at=started)
        for i, (step_id, prev, d) in enumerate(zip(ids, prevs, descriptors), start=1)
    ]  # fmt: skip


def _record_steps_sql(fenced: bool, with_events: bool) -> str:
    fence = " AND owner = %(owner)s AND owner_epoch = %(epoch)s" if fenced else ""
    parts = [
        "r AS (UPDATE responses SET last_sequence = last_sequence + %(n)s"
        f" WHERE id = %(rid)s{fence} RETURNING last_sequence, followed)",
        "i AS (INSERT INTO steps (id, response_id, scope_parent, prev_step_id, sequence, kind,"
        " state, request_payload, attempt, created_at, started_at)"
        " SELECT t.id, %(rid)s::text, %(scope)s::text, t.prev, r.last_sequence - %(n)s + t.n,"
        " t.kind, %(state)s::text, t.payload::json, %(attempt)s::int, %(now)s::float8,"
        " %(started)s::float8 FROM r, unnest(%(ids)b::text[], %(prevs)b::text[],"
        " %(kinds)b::text[], %(payloads)b::text[]) WITH ORDINALITY AS t(id, prev, kind, payload, n))",
    ]
    select = "SELECT r.last_sequence FROM r"
    if with_events:
        parts.append(f"e AS ({postgres_insert('%(rid)s::text', 'r', named=True)})")
        select = (
            "SELECT r.last_sequence, CASE WHEN r.followed"
            f" THEN pg_notify('{EVENTS_CHANNEL}', %(rid)s::text) END FROM r"
        )
    return "WITH " + ", ".join(parts) + " " + select


_RECORD_STEPS = {(f, e): _record_steps_sql(f, e) for f in (False, True) for e in (False, True)}


async def step_write(
    conn: Conn,
    step_id: str,
    sql: str,
    params: tuple[Any, ...],
    target: str | None,
    fence: Fence | None,
    events: Events,
    response_update: dict[str, Any] | None = None,
    conversation_items: Items = None,
) -> Sequence[Any]:
    """One step UPDATE (``sql`` RETURNING the step's columns) with its fence check, events,
    response update and conversation items, in one transaction. ``target`` names the state
    moved to (None: not a transition; no row then means no such step).

    Without conversation items it is one statement, one round trip: the fence check, the UPDATE, the response's update,
    the events and their NOTIFY as CTEs of one query (:func:`_step_statement`). With
    conversation items, a pipelined transaction."""
    if conversation_items is None:
        has_events = bool(events and events[1])
        updates: tuple[str, ...] = tuple(sorted(response_update)) if response_update else ()
        args: list[Any] = []
        if fence is not None:
            args += [step_id, fence.owner, fence.epoch]
        args += params
        if updates:
            assert response_update is not None
            args += [
                dumps_opt(response_update[n]) if n in RESPONSE_JSON_FIELDS else response_update[n]
                for n in updates
            ]  # fmt: skip
        if has_events:
            assert events is not None
            args += postgres_params(*events)
        cursor = await run(conn, _step_statement(sql, fence is not None, has_events, updates), args)
        row = await cursor.fetchone()
        if row is None:
            raise await _why_not(conn, step_id, target, fence)
        return row[:_STEP_WIDTH]
    async with conn.pipeline(), conn.transaction():
        fenced = None
        if fence is not None:
            fenced = await conn.execute(
                _FENCE_BY_STEP_UPDATE if response_update else _FENCE_BY_STEP_SHARE, (step_id,)
            )
        cursor = await conn.execute(sql, params)
        if events and events[1]:
            await conn.execute(_EVENTS_INSERT_BY_STEP, (*postgres_params(*events), step_id))
        followed = True  # unfenced: no lock on the response read, so NOTIFY anyway
        if fenced is not None:
            fence_row = await fenced.fetchone()
            check_fence(fence, f"step {step_id!r}", fence_row)
            followed = fence_row[1]
        row = await cursor.fetchone()
        if row is None:
            if target is None:
                raise StoreNotFoundError(f"step {step_id!r} not found")
            raise await state_error(conn, step_id, target)
        response_id = row[1]
        if response_update:
            sql2, values = _update_sql(response_update)
            await conn.execute(sql2, (*values, response_id))
        if conversation_items is not None:
            await add_items(conn, *conversation_items)
        notify = (events and events[1]) or (response_update and "status" in response_update)
        if notify and followed:
            await conn.execute(_NOTIFY, (EVENTS_CHANNEL, response_id))
    return row


async def update_response(
    conn: Conn,
    response_id: str,
    fields: dict[str, Any],
    fence: Fence | None,
    events: Events,
    conversation_items: Items,
) -> None:
    """Without conversation items one statement: the UPDATE (or, with no fields, a ``FOR
    SHARE`` read) with the fence in its WHERE, the events and the NOTIFY (if the row it locked
    is followed) as CTEs."""
    what = f"response {response_id!r}"
    if conversation_items is not None:
        await _update_with_items(conn, response_id, fields, fence, events, conversation_items)
        return
    has_events = bool(events and events[1])
    names = sorted(fields)  # stable SQL text, so prepared statements are reused
    args: dict[str, Any] = {"rid": response_id}
    for name in names:
        args[f"v_{name}"] = dumps_opt(fields[name]) if name in RESPONSE_JSON_FIELDS else fields[name]
    where = "id = %(rid)s"
    if fence is not None:
        where += " AND owner = %(owner)s AND owner_epoch = %(epoch)s"
        args["owner"], args["epoch"] = fence.owner, fence.epoch
    if names:
        sets = ", ".join(f"{n} = %(v_{n})s" for n in names)
        parts = [f"u AS (UPDATE responses SET {sets} WHERE {where} RETURNING id, followed)"]
    else:
        parts = [f"u AS (SELECT id, followed FROM responses WHERE {where} FOR SHARE)"]
    if has_events:
        assert events is not None
        args.update(postgres_named(*events))
        parts.append(f"e AS ({postgres_insert('u.id', 'u', named=True)})")
    select = "SELECT u.id FROM u"
    if has_events or "status" in fields:
        select = (
            f"SELECT u.id, CASE WHEN u.followed THEN pg_notify('{EVENTS_CHANNEL}', u.id) END FROM u"
        )
    cursor = await run(conn, "WITH " + ", ".join(parts) + " " + select, args)
    if await cursor.fetchone() is None:
        cursor = await conn.execute(
            "SELECT owner, owner_epoch FROM responses WHERE id = %s", (response_id,)
        )
        check_fence(fence, what, await cursor.fetchone())
        raise FencedError(f"{what}: fence is stale")  # changed in between


async def _update_with_items(
    conn: Conn,
    response_id: str,
    fields: dict[str, Any],
    fence: Fence | None,
    events: Events,
    conversation_items: tuple[str, Sequence[dict[str, Any]]],
) -> None:
    what = f"response {response_id!r}"
    if fields:
        sql, values = _update_sql(fields)
        params: tuple[Any, ...] = (*values, response_id)
    else:
        sql, params = _FENCE_BY_RESPONSE_SHARE, (response_id,)
    async with conn.pipeline(), conn.transaction():
        cursor = await conn.execute(sql, params)
        await _queue_events(conn, response_id, events)
        row = await cursor.fetchone()  # (id, followed, owner, owner_epoch), under its lock
        check_fence(fence, what, row)
        await add_items(conn, *conversation_items)
        if ((events and events[1]) or "status" in fields) and row[1]:
            await conn.execute(_NOTIFY, (EVENTS_CHANNEL, response_id))


async def append_events(conn: Conn, response_id: str, events: Events, fence: Fence | None) -> None:
    await update_response(conn, response_id, {}, fence, events, None)


async def claim_responses(
    conn: Conn, owner: str, lease_s: float, limit: int
) -> list[ResponseRecord]:
    """Take over expired-lease, unleased, and dead-owner responses (an owner registered in
    ``owners`` whose session advisory lock can be taken is dead)."""
    now = time.time()
    cursor = await conn.execute(
        "WITH c AS (SELECT id FROM responses WHERE " + UNFINISHED + " AND ("
        " lease_expires_at IS NULL OR lease_expires_at < %s"
        " OR (owner IS DISTINCT FROM %s AND owner IN (SELECT o.owner FROM owners o)"
        "     AND pg_try_advisory_xact_lock(hashtextextended(owner, 0))))"
        " ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
        " UPDATE responses r SET owner = %s, owner_epoch = r.owner_epoch + 1,"
        " lease_expires_at = %s FROM c WHERE r.id = c.id RETURNING " + _RESPONSE_RETURNING,
        (now, owner, limit, owner, now + lease_s),
    )
    records = [response_from_row(row) for row in await cursor.fetchall()]
    records.sort(key=lambda r: (r.created_at, r.id))
    return records
