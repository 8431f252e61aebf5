"""The SQL of the SQLite backend outside the step state machine: registered tools, the durable
event log's reads, cancel flags, conversations and their items, the response listing, and
retention. Worker-thread bodies ``(conn, *args)`` as in :mod:`store.sqlite_ops`, at most one
transaction each.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import orjson

from .event_log import events_after
from .sqlite_ops import RESPONSE_SELECT, insert_conversation_items, response_from_row
from .sqlite_tx import transaction
from .types import ConversationRecord, StoreNotFoundError, ResponseRecord
from .validation import UNFINISHED_STATUSES

_loads = orjson.loads
_UNFINISHED = "status IN ('queued', 'in_progress')"


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# -- events ----------------------------------------------------------------------------------


def list_events(
    conn: sqlite3.Connection, response_id: str, after: int, limit: int | None
) -> list[tuple[int, bytes]]:
    rows = conn.execute(
        "SELECT first_sequence_number, sizes, data FROM event_batches WHERE response_id = ?"
        " AND last_sequence_number > ? ORDER BY last_sequence_number LIMIT ?",
        (response_id, after, -1 if limit is None else limit),  # each row holds >= 1 event
    ).fetchall()
    return events_after(rows, after, limit)


def events_ready(conn: sqlite3.Connection, response_id: str, after: int) -> bool:
    """An event after ``after`` exists, or the response is finished (or gone)."""
    status, newer = conn.execute(
        "SELECT (SELECT status FROM responses WHERE id = ?), EXISTS(SELECT 1 FROM event_batches"
        " WHERE response_id = ? AND last_sequence_number > ?)",
        (response_id, response_id, after),
    ).fetchone()
    return bool(newer) or status is None or status not in UNFINISHED_STATUSES


def poll_changes(
    conn: sqlite3.Connection, version: int | None, watched: list[str]
) -> tuple[int, bool, list[str]]:
    """``(data_version, changed since version, those of the watched ids with a cancel
    request)``: ``data_version`` changes when another connection commits."""
    now = conn.execute("PRAGMA data_version").fetchone()[0]
    changed = version is not None and now != version
    cancelled: list[str] = []
    if watched:
        cancelled = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM responses WHERE cancel_requested = 1 AND id IN ({})".format(
                    ", ".join("?" * len(watched))
                ),
                watched,
            )
        ]
    return now, changed, cancelled


# -- cancellation ----------------------------------------------------------------------------


def request_cancel(conn: sqlite3.Connection, response_id: str) -> bool:
    return conn.execute(
        "UPDATE responses SET cancel_requested = 1 WHERE id = ?", (response_id,)
    ).rowcount > 0


def cancel_requested(conn: sqlite3.Connection, response_id: str) -> bool:
    row = conn.execute(
        "SELECT cancel_requested FROM responses WHERE id = ?", (response_id,)
    ).fetchone()
    return bool(row and row[0])


# -- conversations ---------------------------------------------------------------------------


def _conversation(row: tuple[Any, ...]) -> ConversationRecord:
    return ConversationRecord(row[0], row[1], row[2], _loads(row[3]))


def create_conversation(
    conn: sqlite3.Connection, conversation: ConversationRecord, items: Sequence[dict[str, Any]]
) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO conversations (id, tenant, created_at, metadata) VALUES (?, ?, ?, ?)",
            (conversation.id, conversation.tenant, conversation.created_at,
             _dumps(conversation.metadata or {})),
        )  # fmt: skip
        if items:
            insert_conversation_items(conn, conversation.id, items)


def get_conversation(conn: sqlite3.Connection, conversation_id: str) -> ConversationRecord | None:
    row = conn.execute(
        "SELECT id, tenant, created_at, metadata FROM conversations WHERE id = ?",
        (conversation_id,),
    ).fetchone()
    return None if row is None else _conversation(row)


def update_conversation(
    conn: sqlite3.Connection, conversation_id: str, metadata: dict[str, Any]
) -> ConversationRecord:
    rows = conn.execute(
        "UPDATE conversations SET metadata = ? WHERE id = ? RETURNING id, tenant, created_at, metadata",
        (_dumps(metadata), conversation_id),
    ).fetchall()
    if not rows:
        raise StoreNotFoundError(f"conversation {conversation_id!r} not found")
    return _conversation(rows[0])


def delete_conversation(conn: sqlite3.Connection, conversation_id: str) -> bool:
    with transaction(conn):
        conn.execute("DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,))
        return conn.execute(
            "DELETE FROM conversations WHERE id = ?", (conversation_id,)
        ).rowcount > 0


def add_conversation_items(
    conn: sqlite3.Connection, conversation_id: str, items: Sequence[dict[str, Any]]
) -> None:
    with transaction(conn):
        insert_conversation_items(conn, conversation_id, items)


def list_conversation_items(
    conn: sqlite3.Connection, conversation_id: str, after: str | None, limit: int, order: str
) -> tuple[list[dict[str, Any]], bool]:
    if not conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone():
        raise StoreNotFoundError(f"conversation {conversation_id!r} not found")
    if after is None:
        bound = -1 if order == "asc" else 2**62
    else:
        row = conn.execute(
            "SELECT position FROM conversation_items WHERE conversation_id = ? AND id = ?",
            (conversation_id, after),
        ).fetchone()
        if row is None:
            raise StoreNotFoundError(f"item {after!r} not found in conversation {conversation_id!r}")
        bound = row[0]
    op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    rows = conn.execute(
        f"SELECT item FROM conversation_items WHERE conversation_id = ? AND position {op} ?"
        f" ORDER BY position {direction} LIMIT ?",
        (conversation_id, bound, limit + 1),
    ).fetchall()
    return [_loads(r[0]) for r in rows[:limit]], len(rows) > limit


def get_conversation_item(
    conn: sqlite3.Connection, conversation_id: str, item_id: str
) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?",
        (conversation_id, item_id),
    ).fetchone()
    return None if row is None else _loads(row[0])


def delete_conversation_item(conn: sqlite3.Connection, conversation_id: str, item_id: str) -> bool:
    return conn.execute(
        "DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?",
        (conversation_id, item_id),
    ).rowcount > 0


# -- listing and retention -------------------------------------------------------------------


def list_responses_page(
    conn: sqlite3.Connection,
    tenant: str | None,
    all_tenants: bool,
    status: str | None,
    model: str | None,
    search: str | None,
    after: str | None,
    limit: int,
) -> tuple[list[ResponseRecord], bool]:
    where, params = [], []  # type: ignore[var-annotated]
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
    sql = RESPONSE_SELECT + (" WHERE " + " AND ".join(where) if where else "")
    rows = conn.execute(
        sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    return [response_from_row(r) for r in rows[:limit]], len(rows) > limit


def purge_before(conn: sqlite3.Connection, timestamp: float) -> int:
    with transaction(conn):
        doomed = f"SELECT id FROM responses WHERE created_at < ? AND NOT {_UNFINISHED}"
        conn.execute(f"DELETE FROM steps WHERE response_id IN ({doomed})", (timestamp,))
        conn.execute(f"DELETE FROM event_batches WHERE response_id IN ({doomed})", (timestamp,))
        return conn.execute(
            f"DELETE FROM responses WHERE created_at < ? AND NOT {_UNFINISHED}", (timestamp,)
        ).rowcount


# -- tools -----------------------------------------------------------------------------------


def create_tool(conn: sqlite3.Connection, name: str, tool: dict[str, Any]) -> None:
    now = time.time()
    conn.execute(
        "INSERT INTO tools (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?)",
        (name, _dumps(tool), now, now),
    )


def replace_tool(conn: sqlite3.Connection, name: str, tool: dict[str, Any]) -> None:
    cursor = conn.execute(
        "UPDATE tools SET definition = ?, updated_at = ? WHERE name = ?",
        (_dumps(tool), time.time(), name),
    )
    if cursor.rowcount == 0:
        raise StoreNotFoundError(f"tool {name!r} not found")


def get_tool(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT definition FROM tools WHERE name = ?", (name,)).fetchone()
    return None if row is None else _loads(row[0])


def list_tools(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [_loads(row[0]) for row in conn.execute("SELECT definition FROM tools ORDER BY name")]


def delete_tool(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("DELETE FROM tools WHERE name = ?", (name,)).rowcount > 0
