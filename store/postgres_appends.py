"""Event-log appends on PostgreSQL: those queued in one event-loop turn go to the database in
one statement, and one alone goes as a statement prepared at libpq level.

Streamed responses flush their events at most every ``stream_flush_s``, on a tick grid of the
loop's clock (:mod:`gateway.engine.writer`), so the flushes of every response streaming in a
process fall due together. Each flush is an ``append_events``; one round trip apiece would
cost the gateway a pooled connection, a query and its result, and a NOTIFY echoed back to its
own listener, per response per tick. :class:`AppendBatcher` takes the appends made in one loop
turn and writes them with one ``INSERT … SELECT FROM unnest(…)`` — each row still fenced
(``owner``/``owner_epoch``, under a ``FOR SHARE`` lock of its response), overlap-checked
(:mod:`store.event_log`) and NOTIFYing when followed (read under that lock,
:mod:`store.postgres_ops`), as the single append is. Rows the statement could not
take (a stale fence, an unknown response) and every row of a statement that failed (an overlap
is a unique violation, which aborts the whole statement) are retried one by one through the
single append, which raises the precise error for each; an unreachable database fails them all
with ``StoreUnavailableError`` (the writers retry). One append alone takes the single path.

The single path (:func:`append_one`) is the stream's hottest write: a stored-first stream makes
it for each model call's first delta, before any client sees that delta, and it is the only
write the event log adds to a streamed response on top of the step writes. Through a psycopg
cursor a store's append cost ~255 µs of CPU (a store alone, c=1, uvloop, loopback: the query's
conversion, each parameter's dumper, the prepared-statement cache, the result's loaders);
through psycopg's libpq layer (:mod:`psycopg.pq`: parameters already in wire format, the
statement prepared once per pooled connection under its own name) ~120 µs, most of it the
round trip's waiting and the pool. Scenario 8 (PostgreSQL, streamed): 3.62 → 3.51 M
instructions per response. It stays fenced, overlap-checked and NOTIFYing when
followed, as the statement of :func:`store.postgres_ops.update_response` it replaces; any
answer but the stored row goes to that precise path for its error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from psycopg import errors, pq
from psycopg.generators import execute

from . import postgres_ops as ops
from .event_log import pack_events
from .types import Fence, FencedError, StoreNotFoundError, StoreUnavailableError

__all__ = ["AppendBatcher", "append_one"]

_Append = tuple[str, int, Sequence[bytes], "Fence | None", "asyncio.Future[None]"]
_Run = Callable[..., Awaitable[Any]]

_APPEND_MANY = (
    "WITH b AS (SELECT * FROM unnest(%b::text[], %b::int8[], %b::int8[], %b::bytea[], %b::bytea[],"
    " %b::text[], %b::int8[]) AS t(rid, first, last, sizes, data, owner, epoch)),"
    " f AS (SELECT r.id, r.followed FROM responses r JOIN b ON r.id = b.rid"
    " WHERE b.owner IS NULL OR (r.owner = b.owner AND r.owner_epoch = b.epoch) FOR SHARE OF r),"
    " i AS (INSERT INTO event_batches (response_id, last_sequence_number, first_sequence_number,"
    " sizes, data) SELECT b.rid, coalesce((SELECT max(e.last_sequence_number) FROM event_batches e"
    " WHERE e.response_id = b.rid AND e.last_sequence_number >= b.first), b.last), b.first,"
    " b.sizes, b.data FROM b JOIN f ON f.id = b.rid RETURNING response_id)"
    f" SELECT i.response_id, CASE WHEN f.followed THEN pg_notify('{ops.EVENTS_CHANNEL}',"
    " i.response_id) END FROM i JOIN f ON f.id = i.response_id"
)


_STATEMENT = b"stepchain_append_1"  # our own name: psycopg's cache names its own _pg3_<n>
_APPEND_ONE = (
    "WITH u AS (SELECT id, followed FROM responses WHERE id = $1"
    " AND ($2::text IS NULL OR (owner = $2 AND owner_epoch = $3::bigint)) FOR SHARE),"
    " e AS (INSERT INTO event_batches (response_id, last_sequence_number, first_sequence_number,"
    " sizes, data) SELECT u.id, coalesce((SELECT max(b.last_sequence_number) FROM event_batches b"
    " WHERE b.response_id = u.id AND b.last_sequence_number >= $4::bigint), $5::bigint),"
    " $4::bigint, $6::bytea, $7::bytea FROM u)"
    f" SELECT CASE WHEN u.followed THEN pg_notify('{ops.EVENTS_CHANNEL}', u.id) END FROM u"
).encode()
_TEXT, _INT8, _BYTEA = 25, 20, 17  # type oids
_TYPES = (_TEXT, _TEXT, _INT8, _INT8, _INT8, _BYTEA, _BYTEA)
_FORMATS = (0, 0, 0, 0, 0, 1, 1)  # text, except the two bytea (binary: no escaping)
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name: the session lost it (a pooler's DISCARD)


async def append_one(
    conn: Any, response_id: str, first: int, events: Sequence[bytes], fence: Fence | None
) -> None:
    """``Store.append_events`` of one non-empty batch on ``conn`` (a pooled connection in
    autocommit, idle), as one prepared statement (see the module's docstring). Raises as
    :func:`store.postgres_ops.append_events`: ``FencedError``, ``StoreNotFoundError``, a
    ``psycopg.errors.UniqueViolation`` for an overlap, ``psycopg.OperationalError`` for a lost
    connection (the store's ``_run`` translates the last two)."""
    if "\x00" in response_id:  # names no row (store.postgres); libpq would cut text at a NUL
        raise StoreNotFoundError(f"response {response_id!r} not found")
    if not isinstance(conn, ops.StoreConnection) or (fence is not None and "\x00" in fence.owner):
        await ops.append_events(conn, response_id, (first, events), fence)
        return
    first, last, sizes, data = pack_events(first, events)
    # Ids, owners and numbers are ASCII: their text form is the same in every client encoding.
    params = (
        response_id.encode(), None if fence is None else fence.owner.encode(),
        None if fence is None else b"%d" % fence.epoch, b"%d" % first, b"%d" % last, sizes, data,
    )  # fmt: skip
    pgconn = conn.pgconn
    for attempt in (1, 2):
        if not conn.append_prepared:
            pgconn.send_prepare(_STATEMENT, _APPEND_ONE, _TYPES)
            (result,) = await conn.wait(execute(pgconn))
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise errors.error_from_result(result)
            conn.append_prepared = True
        pgconn.send_query_prepared(_STATEMENT, params, _FORMATS)
        (result,) = await conn.wait(execute(pgconn))
        if result.status == pq.ExecStatus.TUPLES_OK:
            break
        if attempt == 1 and result.error_field(pq.DiagnosticField.SQLSTATE) == _NO_SUCH_STATEMENT:
            conn.append_prepared = False
            continue
        raise errors.error_from_result(result)
    if result.ntuples == 0:  # not stored: a stale fence or no such response; the precise error
        await ops.append_events(conn, response_id, (first, []), fence)
        raise FencedError(f"response {response_id!r}: fence is stale")  # changed in between


async def _append_many(conn: Any, appends: list[_Append]) -> set[str]:
    """One statement for ``appends`` (distinct responses); the response ids it stored."""
    columns: list[list[Any]] = [[] for _ in range(7)]
    for response_id, first, events, fence, _future in appends:
        first, last, sizes, data = pack_events(first, events)
        row = (response_id, first, last, sizes, data,
               None if fence is None else fence.owner, None if fence is None else fence.epoch)  # fmt: skip
        for column, value in zip(columns, row):
            column.append(value)
    cursor = await conn.execute(_APPEND_MANY, columns)
    return {row[0] for row in await cursor.fetchall()}


class AppendBatcher:
    """``await append(response_id, first, events, fence)``: as ``Store.append_events`` (its
    checks done by the caller), grouped with the other appends of the same loop turn. ``run``
    is the store's ``_run(fn, *args)`` (a pooled connection, errors as StoreError)."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._queue: list[_Append] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def append(
        self, response_id: str, first: int, events: Sequence[bytes], fence: Fence | None
    ) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((response_id, first, events, fence, future))
        if len(self._queue) == 1:
            loop.call_soon(self._drain)  # after every task this turn runs has queued its own
        await future

    def _drain(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._write(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[_Append]) -> None:
        stored: set[str] = set()
        if len(batch) > 1 and len({a[0] for a in batch}) == len(batch):
            try:
                stored = await self._run(_append_many, batch)
            except StoreUnavailableError as exc:
                for append in batch:
                    _settle(append[4], exc)
                return
            except Exception:  # an overlap or any other row's error: each alone says which
                stored = set()
        rest = []
        for append in batch:
            if append[0] in stored:
                _settle(append[4], None)
            else:
                rest.append(append)
        for append in rest:  # in order: two appends of one response stay in sequence
            response_id, first, events, fence, future = append
            try:
                await self._run(append_one, response_id, first, events, fence)
            except Exception as exc:
                _settle(future, exc)
            else:
                _settle(future, None)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return  # its caller was cancelled meanwhile
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
