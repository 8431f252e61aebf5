"""The durable event log's row format, shared by both backends: one row per write.

Each store write that carries events (``events=(first_sequence, [bytes, ...])``, or
:meth:`store.base.Store.append_events`) adds **one** row to ``event_batches``::

    response_id            text
    last_sequence_number   int    the batch's last event (primary key with response_id)
    first_sequence_number  int    its first event
    sizes                  bytes  each event's length, 4 bytes big-endian apiece, in order
    data                   bytes  the events, concatenated

A row per write instead of a row per event: a streamed response's dozen-odd events cost two or
three index entries instead of one each (the log's share of a streamed response's gateway CPU
fell by about half in ``bench/`` scenario 8). The store keeps no assumption about what an event
contains (any bytes, empty included): ``sizes`` gives the boundaries.

An append never overlaps what is stored: the row's key is the batch's last sequence number, or
— when a stored batch already ends at or after the new batch's first — that stored batch's
last sequence number, so the insert fails on the primary key (``StoreConflictError``) inside
the write's transaction, on SQLite and PostgreSQL alike (:data:`SQLITE_INSERT`,
:func:`postgres_insert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from struct import Struct, pack, unpack

__all__ = [
    "SQLITE_INSERT", "events_after", "pack_events", "postgres_insert", "postgres_named",
    "postgres_params", "sqlite_append_rows", "sqlite_params", "sqlite_rows_params",
    "unpack_events",
]

_ONE = Struct(">I")

#: Parameters: :func:`sqlite_params`.
SQLITE_INSERT = (
    "INSERT INTO event_batches (response_id, last_sequence_number, first_sequence_number,"
    " sizes, data) VALUES (?, coalesce((SELECT max(last_sequence_number) FROM event_batches"
    " WHERE response_id = ? AND last_sequence_number >= ?), ?), ?, ?, ?)"
)


def postgres_insert(response_id: str, source: str, *, named: bool = False) -> str:
    """The PostgreSQL ``INSERT … SELECT`` of one batch: the response id is the SQL expression
    ``response_id`` (a column of ``source``, or a named parameter), ``source`` the rest of the
    query after ``FROM`` (e.g. a CTE's name, or ``responses r WHERE r.id = %s``). Its
    parameters: positional, :func:`postgres_params`' five before any of ``source``'s; named
    (``named=True``), :func:`postgres_named`'s."""
    if named:
        first, last, sizes, data = "%(ev_first)s", "%(ev_last)s", "%(ev_sizes)b", "%(ev_data)b"
    else:
        first, last, sizes, data = "%s", "%s", "%b", "%b"
    return (
        "INSERT INTO event_batches (response_id, last_sequence_number, first_sequence_number,"
        f" sizes, data) SELECT {response_id}, coalesce((SELECT max(b.last_sequence_number)"
        f" FROM event_batches b WHERE b.response_id = {response_id}"
        f" AND b.last_sequence_number >= {first}::bigint), {last}::bigint),"
        f" {first}::bigint, {sizes}::bytea, {data}::bytea FROM {source}"
    )


@lru_cache(maxsize=128)
def sqlite_append_rows(count: int) -> str:
    """The SQLite ``INSERT … SELECT`` appending ``count`` batches to ``count`` different
    responses in one statement (the appends that one SQLite transaction groups). Each batch is
    inserted only if its response exists and its fence (owner, epoch) holds, or it has no fence
    (both NULL); the statement's row count says how many were. Parameters:
    :func:`sqlite_rows_params`, seven per batch. Its overlap check reads only what was stored
    before the statement (SQLite runs the SELECT to completion first), so the response ids
    must differ."""
    rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * count)
    return (
        "INSERT INTO event_batches (response_id, last_sequence_number, first_sequence_number,"
        " sizes, data) SELECT v.column1, coalesce((SELECT max(b.last_sequence_number)"
        " FROM event_batches b WHERE b.response_id = v.column1"
        " AND b.last_sequence_number >= v.column2), v.column3), v.column2, v.column4, v.column5"
        f" FROM (VALUES {rows}) v JOIN responses r ON r.id = v.column1"
        " WHERE v.column6 IS NULL OR (r.owner = v.column6 AND r.owner_epoch = v.column7)"
    )


def sqlite_rows_params(
    response_id: str, first: int, events: Sequence[bytes], owner: str | None, epoch: int | None
) -> tuple[object, ...]:
    """One batch's seven parameters of :func:`sqlite_append_rows` (non-empty ``events``)."""
    first, last, sizes, data = pack_events(first, events)
    return response_id, first, last, sizes, data, owner, epoch


def postgres_params(first: int, events: Sequence[bytes]) -> list[object]:
    """The positional parameters of :func:`postgres_insert` for a non-empty batch."""
    first, last, sizes, data = pack_events(first, events)
    return [first, last, first, sizes, data]


def postgres_named(first: int, events: Sequence[bytes]) -> dict[str, object]:
    """The named parameters of :func:`postgres_insert` (``named=True``) for a non-empty batch."""
    first, last, sizes, data = pack_events(first, events)
    return {"ev_first": first, "ev_last": last, "ev_sizes": sizes, "ev_data": data}


def pack_events(first: int, events: Sequence[bytes]) -> tuple[int, int, bytes, bytes]:
    """``(first, last, sizes, data)`` of a non-empty batch starting at sequence ``first``."""
    count = len(events)
    if count == 1:
        event = bytes(events[0])
        return first, first, _ONE.pack(len(event)), event
    return first, first + count - 1, pack(f">{count}I", *map(len, events)), b"".join(events)


def sqlite_params(response_id: str, first: int, events: Sequence[bytes]) -> tuple[object, ...]:
    """The parameters of :data:`SQLITE_INSERT` for a non-empty batch."""
    first, last, sizes, data = pack_events(first, events)
    return response_id, response_id, first, last, first, sizes, data


def unpack_events(first: int, sizes: bytes, data: bytes) -> list[tuple[int, bytes]]:
    """A row's ``(sequence_number, event)`` pairs. ``ValueError`` if ``sizes`` and ``data``
    disagree (a corrupt row)."""
    data = bytes(data)
    lengths = unpack(f">{len(sizes) // 4}I", sizes)
    if len(sizes) % 4 or sum(lengths) != len(data):
        raise ValueError("corrupt event batch: its sizes do not match its data")
    out = []
    position = 0
    for sequence, length in enumerate(lengths, first):
        end = position + length
        out.append((sequence, data[position:end]))
        position = end
    return out


def events_after(
    rows: Sequence[tuple[int, bytes, bytes]], after: int, limit: int | None
) -> list[tuple[int, bytes]]:
    """The events of ``rows`` (``(first_sequence_number, sizes, data)``, ascending) with
    sequence number > ``after``, at most ``limit`` (None: all). ``ValueError`` for a corrupt row."""
    out: list[tuple[int, bytes]] = []
    for first, sizes, data in rows:
        if first > after and len(sizes) == 4:  # the common case: a whole one-event row
            out.append((first, bytes(data)))
        else:
            out += [pair for pair in unpack_events(first, sizes, data) if pair[0] > after]
    return out if limit is None else out[:limit]
