"""The PostgreSQL store's methods outside the step state machine: the durable event log's reads
and waits, owner liveness, cancellation, conversations, the response listing and retention.

A mixin of :class:`store.postgres.PostgresStore` (it uses that class's ``_run``/``_fetchall``
helpers, its :class:`store.notify.Waiters` fed by ``LISTEN``, and its dedicated owner
connection); kept apart so each module holds one concept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from . import postgres_ops as ops
from .event_log import events_after
from .notify import wait_until
from .types import (
    StoreConflictError,
    ConversationRecord,
    Fence,
    StoreNotFoundError,
    ResponseRecord,
    StoreError,
)
from .validation import UNFINISHED_STATUSES, check_conversation_items, check_events, check_page

if TYPE_CHECKING:
    from .postgres import PostgresStore as _Base
else:
    _Base = object

__all__ = ["PostgresRecords"]

logger = logging.getLogger(__name__)
Conn = psycopg.AsyncConnection[Any]
_LOCK = "hashtextextended(%s, 0)"
#: How many followed response ids a store remembers (see PostgresRecords._follow).
_FOLLOWED_KEPT = 10_000
_CONVERSATION = "SELECT id, tenant, created_at, metadata FROM conversations"


async def _create_conversation(conn: Conn, c: ConversationRecord, items: Sequence[dict[str, Any]]) -> None:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO conversations (id, tenant, created_at, metadata) VALUES (%s, %s, %s, %s)",
            (c.id, c.tenant, c.created_at, ops.dumps(c.metadata or {})),
        )
        if items:
            await ops.add_items(conn, c.id, items)


async def _add_items(conn: Conn, conversation_id: str, items: Sequence[dict[str, Any]]) -> None:
    async with conn.transaction():
        await ops.add_items(conn, conversation_id, items)


async def _list_items(
    conn: Conn, conversation_id: str, after: str | None, limit: int, order: str
) -> tuple[list[dict[str, Any]], bool]:
    cursor = await conn.execute(
        "SELECT (SELECT 1 FROM conversations WHERE id = %s),"
        " (SELECT position FROM conversation_items WHERE conversation_id = %s AND id = %s)",
        (conversation_id, conversation_id, after),
    )
    exists, position = await cursor.fetchone()  # type: ignore[misc]
    if not exists:
        raise StoreNotFoundError(f"conversation {conversation_id!r} not found")
    if after is not None and position is None:
        raise StoreNotFoundError(f"item {after!r} not found in conversation {conversation_id!r}")
    if position is None:
        position = -1 if order == "asc" else 2**62
    op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    cursor = await conn.execute(
        f"SELECT item FROM conversation_items WHERE conversation_id = %s AND position {op} %s"
        f" ORDER BY position {direction} LIMIT %s",
        (conversation_id, position, limit + 1),
    )
    rows = await cursor.fetchall()
    return [r[0] for r in rows[:limit]], len(rows) > limit


class PostgresRecords(_Base):
    """Event log reads, liveness, cancellation, conversations, listing, retention."""

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
        if events:  # with the other appends of this loop turn (store.postgres_appends)
            await self._appends.append(response_id, first_sequence, events, fence)

    async def list_events(
        self, response_id: str, *, after: int = -1, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        rows = await self._fetchall(
            "SELECT first_sequence_number, sizes, data FROM event_batches WHERE response_id = %s"
            " AND last_sequence_number > %s ORDER BY last_sequence_number LIMIT %s",
            (response_id, after, limit),  # each row holds >= 1 event; NULL: no limit
        )
        return events_after(rows, after, limit)

    async def _events_ready(self, response_id: str, after: int) -> bool:
        row = await self._fetchone(
            "SELECT (SELECT status FROM responses WHERE id = %s), EXISTS(SELECT 1 FROM event_batches"
            " WHERE response_id = %s AND last_sequence_number > %s)",
            (response_id, response_id, after),
        )
        # No row: an id holding NUL, which names no response (store.postgres).
        return row is None or bool(row[1]) or row[0] is None or row[0] not in UNFINISHED_STATUSES

    async def wait_events(self, response_id: str, after: int, timeout_s: float) -> None:
        """As :meth:`store.base.Store.wait_events`; first marks the response followed, so that
        writes NOTIFY its events (:mod:`store.postgres_ops`). The mark commits before the first
        readiness check: a write holding the row's lock delays it until that write commits."""
        await self._follow(response_id)
        await wait_until(
            self._waiters, "events", response_id,
            lambda: self._events_ready(response_id, after), timeout_s, self._poll,
        )  # fmt: skip

    async def _follow(self, response_id: str) -> None:
        """Set ``responses.followed`` once per response and store object (the ids marked are
        remembered, the last :data:`_FOLLOWED_KEPT`); a follower's later waits write nothing.
        An unknown response is not remembered: it may yet be created."""
        followed = self._followed
        if response_id in followed:
            followed.move_to_end(response_id)
            return
        # The statement's snapshot tells whether the row exists (followed already or not).
        row = await self._fetchone(
            "WITH u AS (UPDATE responses SET followed = true WHERE id = %s AND NOT followed"
            " RETURNING id) SELECT 1 FROM responses WHERE id = %s",
            (response_id, response_id),
        )
        if row is not None:
            followed[response_id] = None
            if len(followed) > _FOLLOWED_KEPT:
                followed.popitem(last=False)

    # -- liveness ----------------------------------------------------------------------------

    async def _lock_owner(self, conn: Conn, owner: str) -> bool:
        cursor = await conn.execute(f"SELECT pg_try_advisory_lock({_LOCK})", (owner,))
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def register_owner(self, owner: str) -> None:
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open")
        async with self._owner_lock:
            if owner in self._owners:
                return
            try:
                if self._owner_conn is None or self._owner_conn.closed:
                    self._owner_conn = await self._connect()
                    self._spawn(self._keep_owners())
                if not await self._lock_owner(self._owner_conn, owner):
                    raise StoreConflictError(f"owner {owner!r} is registered by a live process")
            except psycopg.Error as exc:
                raise self._down(exc) from None
            self._owners.add(owner)
        await self._rowcount(
            "INSERT INTO owners (owner, registered_at) VALUES (%s, %s)"
            " ON CONFLICT (owner) DO UPDATE SET registered_at = EXCLUDED.registered_at",
            (owner, time.time()),
        )

    async def release_owner(self, owner: str) -> None:
        async with self._owner_lock:
            if owner not in self._owners:
                return
            self._owners.discard(owner)
            conn = self._owner_conn
            if conn is not None and not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute(f"SELECT pg_advisory_unlock({_LOCK})", (owner,))

    async def _keep_owners(self) -> None:
        """Check the owner connection every 2 s; when it was lost, reconnect and re-take the
        locks (until then, other replicas may judge these owners dead: their writes are then
        fenced, which is the safe outcome)."""
        while self._pool is not None:
            await asyncio.sleep(2.0)
            async with self._owner_lock:
                conn = self._owner_conn
                try:
                    if conn is None or conn.closed:
                        raise psycopg.OperationalError("owner connection closed")
                    await conn.execute("SELECT 1")
                except psycopg.Error:
                    if conn is not None:
                        with contextlib.suppress(Exception):  # a cancel must end the task
                            await conn.close()
                    self._owner_conn = None
                    try:
                        conn = await self._connect()
                    except psycopg.Error:
                        continue
                    self._owner_conn = conn
                    for owner in list(self._owners):
                        with contextlib.suppress(psycopg.Error):
                            if not await self._lock_owner(conn, owner):
                                logger.warning("owner %s is now held by another process", owner)

    # -- cancellation ------------------------------------------------------------------------

    async def request_cancel(self, response_id: str) -> bool:
        row = await self._fetchone(
            "WITH u AS (UPDATE responses SET cancel_requested = true WHERE id = %s RETURNING id)"
            " SELECT pg_notify(%s, u.id) FROM u",
            (response_id, ops.CANCEL_CHANNEL),
        )
        if row is not None:
            self._waiters.notify("cancel", response_id)
        return row is not None

    async def _cancel_requested(self, response_id: str) -> bool:
        row = await self._fetchone(
            "SELECT cancel_requested FROM responses WHERE id = %s", (response_id,)
        )
        return bool(row and row[0])

    async def wait_cancel(self, response_id: str, timeout_s: float | None = None) -> bool:
        return await wait_until(
            self._waiters, "cancel", response_id,
            lambda: self._cancel_requested(response_id), timeout_s, self._poll,
        )  # fmt: skip

    # -- conversations -----------------------------------------------------------------------

    async def create_conversation(
        self, conversation: ConversationRecord, items: Sequence[dict[str, Any]] = ()
    ) -> None:
        check_conversation_items(items)
        await self._run(_create_conversation, conversation, list(items))

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        row = await self._fetchone(_CONVERSATION + " WHERE id = %s", (conversation_id,))
        return None if row is None else ConversationRecord(*row)

    async def update_conversation(
        self, conversation_id: str, metadata: dict[str, Any]
    ) -> ConversationRecord:
        row = await self._fetchone(
            "UPDATE conversations SET metadata = %s WHERE id = %s"
            " RETURNING id, tenant, created_at, metadata",
            (ops.dumps(metadata), conversation_id),
        )
        if row is None:
            raise StoreNotFoundError(f"conversation {conversation_id!r} not found")
        return ConversationRecord(*row)

    async def delete_conversation(self, conversation_id: str) -> bool:
        return await self._rowcount("DELETE FROM conversations WHERE id = %s", (conversation_id,)) > 0

    async def add_conversation_items(
        self, conversation_id: str, items: Sequence[dict[str, Any]]
    ) -> None:
        check_conversation_items(items)
        await self._run(_add_items, conversation_id, list(items))

    async def list_conversation_items(
        self,
        conversation_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: str = "desc",
    ) -> tuple[list[dict[str, Any]], bool]:
        check_page(limit, order)
        if "\x00" in conversation_id + (after or ""):  # no stored id holds NUL (store.postgres)
            raise StoreNotFoundError(f"conversation {conversation_id!r} or item {after!r} not found")
        return await self._run(_list_items, conversation_id, after, limit, order)

    async def get_conversation_item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        row = await self._fetchone(
            "SELECT item FROM conversation_items WHERE conversation_id = %s AND id = %s",
            (conversation_id, item_id),
        )
        return None if row is None else row[0]

    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        return await self._rowcount(
            "DELETE FROM conversation_items WHERE conversation_id = %s AND id = %s",
            (conversation_id, item_id),
        ) > 0

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
        where: list[str] = []
        params: list[Any] = []
        if not all_tenants:
            where.append("tenant IS NOT DISTINCT FROM %s")
            params.append(tenant)
        for column, value in (("status", status), ("model", model)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if search:
            where.append("strpos(id, %s) > 0")
            params.append(search)
        if after is not None:
            row = await self._fetchone("SELECT created_at FROM responses WHERE id = %s", (after,))
            if row is None:
                raise StoreNotFoundError(f"response {after!r} not found")
            where.append("(created_at, id) < (%s, %s)")
            params += [row[0], after]
        sql = ops.RESPONSE_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        rows = await self._fetchall(
            sql + " ORDER BY created_at DESC, id DESC LIMIT %s", (*params, limit + 1)
        )
        return [ops.response_from_row(r) for r in rows[:limit]], len(rows) > limit

    async def purge_before(self, timestamp: float) -> int:
        # Steps and events go with their responses (ON DELETE CASCADE).
        return await self._rowcount(
            f"DELETE FROM responses WHERE created_at < %s AND NOT {ops.UNFINISHED}", (timestamp,)
        )
