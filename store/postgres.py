"""The PostgreSQL backend of the step-chain store: one database shared by several replicas.

psycopg 3 (async) with a ``psycopg_pool.AsyncConnectionPool``; every store method borrows one
connection (autocommit) and does its work in at most one transaction, multi-statement writes in
pipeline mode (:mod:`store.postgres_ops`). Besides the pool the store keeps two dedicated
connections: one ``LISTEN``\\s for new events and cancel requests (fanned out in-process to
``wait_events`` / ``wait_cancel``), one holds the session-level advisory locks of the owners
registered with :meth:`PostgresStore.register_owner` (their liveness).

Errors: ``psycopg`` errors become :class:`store.types.StoreError` subclasses in one place
(:meth:`PostgresStore._run`); a lost or unreachable server is
:class:`store.types.StoreUnavailableError`, raised within ``pool_timeout_s``.

NUL: PostgreSQL ``text`` cannot hold U+0000, so no stored id, name or model holds one. A key
holding it names no row (lookups find nothing, updates and deletes change nothing, as on SQLite
for an unknown key); writing it into a text column is a ValueError (bad input), never an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
from psycopg import conninfo
from psycopg.types.json import set_json_loads

from . import postgres_ops as ops
from .base import Store
from .notify import Waiters
from .postgres_records import PostgresRecords
from .postgres_appends import AppendBatcher
from .postgres_schema import apply_migrations
from .types import (
    CANCELED,
    COMPLETED,
    FAILED,
    PROCESSING,
    StoreConflictError,
    Fence,
    StoreNotFoundError,
    ResponseRecord,
    Step,
    StepDescriptor,
    StoreError,
    StoreUnavailableError,
    new_id,
)
from .validation import (
    check_conversation_items,
    check_events,
    check_kinds,
    check_response_fields,
    check_step_ids,
)

__all__ = ["PostgresStore"]

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03"})
_Op = Callable[..., Awaitable[_T]]


_NUL_ERROR = "cannot contain NUL"
_NUL_MESSAGE = "text values (ids, names, models) cannot contain NUL (U+0000)"


def _holds_nul(sql: str, params: Sequence[Any]) -> bool:
    """True when a text parameter holds U+0000, so the statement can match no row (see the
    module docstring); ValueError when the statement is an INSERT that would store it."""
    if not any(isinstance(p, str) and "\x00" in p for p in params):
        return False
    if sql.lstrip()[:6].upper() == "INSERT":
        raise ValueError(_NUL_MESSAGE)
    return True


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_STATES


class PostgresStore(PostgresRecords, Store):
    """:class:`store.base.Store` on a PostgreSQL (≥ 12) database.

    ``dsn`` is a libpq URL or key=value string (``postgresql://user:pw@host:5432/db``).
    ``max_size`` bounds the pool; ``pool_timeout_s`` is how long a call waits for a connection
    before raising StoreUnavailableError; ``connect_timeout_s`` bounds each connection attempt.
    ``poll_s`` is how often waiters re-check while the ``LISTEN`` connection is down. The
    password never appears in a message, log line or repr.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        poll_s: float = 0.25,
    ) -> None:
        try:
            params = conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"not a PostgreSQL URL: {str(exc).splitlines()[0]}") from None
        self._dsn = dsn
        self._password = str(params.get("password") or "")
        host = params.get("host") or params.get("hostaddr") or "localhost"
        self.where = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"
        self._min_size, self._max_size = min_size, max_size
        self._pool_timeout_s = pool_timeout_s
        self._connect_timeout = max(2, int(round(connect_timeout_s)))
        self._poll_s = poll_s
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._waiters = Waiters()
        self._followed: OrderedDict[str, None] = OrderedDict()  # responses marked followed
        self._appends = AppendBatcher(self._run)
        self._listening = False
        self._tasks: list[asyncio.Task[None]] = []
        self._owners: set[str] = set()
        self._owner_conn: psycopg.AsyncConnection[Any] | None = None
        self._owner_lock = asyncio.Lock()
        self._checking = False
        self._suspect_until = 0.0
        self._listen_conn: psycopg.AsyncConnection[Any] | None = None

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return f"<PostgresStore {self.where} {state}>"

    # -- connections and errors ------------------------------------------------------------

    def _reason(self, exc: BaseException) -> str:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        return reason

    def _down(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"PostgreSQL at {self.where} is unavailable: {self._reason(exc)}")

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self._dsn, **self._conn_kwargs())
        set_json_loads(orjson.loads, conn)
        return conn

    def _conn_kwargs(self) -> dict[str, Any]:
        """Connection options: autocommit, the connect timeout, and TCP keepalives plus a user
        timeout so a server that vanished from the network (no reset) is noticed in ~10 s
        instead of hanging a call until the kernel gives up."""
        return {
            "autocommit": True, "connect_timeout": self._connect_timeout, "keepalives": 1,
            "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        }  # fmt: skip

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        set_json_loads(orjson.loads, conn)

    def _suspect(self) -> None:
        """The server went away (or just came back): for the next 30 s, check each pooled
        connection before use (one empty query), so connections broken by the outage are
        replaced instead of failing one call each."""
        self._suspect_until = time.monotonic() + 30.0

    async def _check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if time.monotonic() < self._suspect_until:
            await conn.execute("")  # raises on a broken connection: the pool replaces it

    async def _run(self, fn: _Op[_T], *args: Any) -> _T:
        """Run ``fn(conn, *args)`` on a pooled connection; errors come back as StoreError."""
        pool = self._pool
        if pool is None:
            raise StoreError("the PostgreSQL store is not open")
        try:
            async with pool.connection() as conn:
                return await fn(conn, *args)
        except StoreError:
            raise
        except psycopg.errors.UniqueViolation as exc:
            raise StoreConflictError(f"already exists: {self._reason(exc)}") from None
        except psycopg.errors.ForeignKeyViolation as exc:
            raise StoreNotFoundError(f"not found: {self._reason(exc)}") from None
        except psycopg_pool.PoolClosed:
            raise StoreError("the PostgreSQL store is not open") from None
        except psycopg.DataError as exc:
            if _NUL_ERROR in str(exc):
                raise ValueError(_NUL_MESSAGE) from None
            raise StoreError(f"postgresql error: {self._reason(exc)}") from None
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            if _unavailable(exc):
                self._suspect()
                self._check_pool()
                raise self._down(exc) from None
            raise StoreError(f"postgresql error: {self._reason(exc)}") from None
        except orjson.JSONEncodeError as exc:
            raise StoreError(f"value is not JSON-serialisable: {exc}") from None

    def _check_pool(self) -> None:
        """After a connection error, drop the pool's other broken connections in the background
        so the calls after the server returns get fresh ones."""
        pool = self._pool
        if pool is None or self._checking:
            return
        self._checking = True

        async def check() -> None:
            try:
                await pool.check()
            except Exception:  # the pool logs; the next call reports the outage
                pass
            finally:
                self._checking = False

        self._spawn(check())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if _holds_nul(sql, params):
            return []

        async def go(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cursor = await ops.run(conn, sql, params)
            return await cursor.fetchall()

        return await self._run(go)

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        if _holds_nul(sql, params):
            return 0

        async def go(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await ops.run(conn, sql, params)
            return cursor.rowcount

        return await self._run(go)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, apply pending migrations (once across replicas), open the pool and start the
        ``LISTEN`` connection. Raises StoreUnavailableError naming host, port and database when
        the server cannot be reached or refuses the login."""
        if self._pool is not None:
            return
        try:
            conn = await self._connect()
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {self.where}: {self._reason(exc)}"
            ) from None
        try:
            await apply_migrations(conn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot migrate PostgreSQL at {self.where}: {self._reason(exc)}") from None
        finally:
            await conn.close()
        pool = psycopg_pool.AsyncConnectionPool(
            self._dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._pool_timeout_s,
            kwargs=self._conn_kwargs(),
            connection_class=ops.StoreConnection,
            configure=self._configure,
            check=self._check,
            # Give up a failing reconnect attempt soon: the next call starts a fresh one, so
            # a server back after a long outage is used at once (not after a long backoff).
            reconnect_timeout=max(10.0, 2 * self._pool_timeout_s),
            open=False,
            name="stepchain",
        )
        try:
            await pool.open(wait=True, timeout=self._pool_timeout_s + self._connect_timeout)
        except psycopg_pool.PoolTimeout as exc:
            await pool.close()
            raise self._down(exc) from None
        try:
            listener = await self._start_listening()
        except psycopg.Error as exc:
            await pool.close()
            raise self._down(exc) from None
        self._pool = pool
        self._listening, self._listen_conn = True, listener
        self._tasks.append(asyncio.ensure_future(self._listen(listener)))

    async def close(self) -> None:
        """Stop the listener, release owner locks, close every connection. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        listener, self._listen_conn = self._listen_conn, None
        if listener is not None:  # a listener task cancelled before it ran never closed it
            await listener.close()
        self._waiters.wake_all()
        owner_conn, self._owner_conn = self._owner_conn, None
        self._owners.clear()
        if owner_conn is not None:
            await owner_conn.close()
        await pool.close()

    async def _start_listening(self) -> psycopg.AsyncConnection[Any]:
        conn = await self._connect()
        try:
            await conn.execute(f"LISTEN {ops.EVENTS_CHANNEL}")
            await conn.execute(f"LISTEN {ops.CANCEL_CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _listen(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """Keep one connection LISTENing (``conn``: the first one, made by :meth:`open`); after
        losing it, reconnect with backoff, and wake every waiter on each change (they re-check)."""
        backoff = 0.1
        while True:
            try:
                if conn is None:
                    conn = self._listen_conn = await self._start_listening()
                    self._suspect()  # back after an outage: pooled connections may be stale
                self._listening, backoff = True, 0.1
                self._waiters.wake_all()
                async for note in conn.notifies():
                    channel = "events" if note.channel == ops.EVENTS_CHANNEL else "cancel"
                    self._waiters.notify(channel, note.payload)
            except psycopg.Error:
                self._suspect()
            finally:
                self._listening = False
                if conn is not None:
                    # Exception, not BaseException: a cancel arriving here must end the task
                    # (else asyncio.run's shutdown waits for it forever and the process hangs).
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
            self._waiters.wake_all()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _poll(self) -> float | None:
        return None if self._listening else self._poll_s

    # -- responses -----------------------------------------------------------------------------

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
        return await self._run(ops.create_response, response, owner, expires, first_steps, ids, events)

    async def claim_responses(
        self, owner: str, lease_s: float, *, limit: int = 100
    ) -> list[ResponseRecord]:
        return await self._run(ops.claim_responses, owner, lease_s, limit)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        return await self._rowcount(
            f"UPDATE responses SET lease_expires_at = %s WHERE owner = %s AND {ops.UNFINISHED}",
            (time.time() + lease_s, owner),
        )

    async def release_leases(self, owner: str) -> int:
        return await self._rowcount(
            f"UPDATE responses SET lease_expires_at = NULL WHERE owner = %s AND {ops.UNFINISHED}",
            (owner,),
        )

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        row = await self._fetchone(ops.RESPONSE_SELECT + " WHERE id = %s", (response_id,))
        return None if row is None else ops.response_from_row(row)

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

    async def delete_response(self, response_id: str) -> bool:
        # Steps and events go with it (ON DELETE CASCADE).
        return await self._rowcount("DELETE FROM responses WHERE id = %s", (response_id,)) > 0

    async def list_responses(self, statuses: Sequence[str]) -> list[ResponseRecord]:
        if not statuses:
            return []
        rows = await self._fetchall(
            ops.RESPONSE_SELECT + " WHERE status = ANY(%s) ORDER BY created_at, id", (list(statuses),)
        )
        return [ops.response_from_row(row) for row in rows]

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
        check_kinds(descriptors)
        check_events(events)
        given = check_step_ids(ids, descriptors)
        ids = given if given is not None else [new_id("step") for _ in descriptors]
        return await self._run(
            ops.record_steps, response_id, scope_parent, prev_step_id, descriptors, ids, start,
            fence, events,
        )  # fmt: skip

    async def mark_processing(
        self, step_id: str, *, fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> Step:  # fmt: skip
        check_events(events)
        row = await self._run(
            ops.step_write, step_id, ops.MARK_PROCESSING, (time.time(), step_id), PROCESSING,
            fence, events,
        )  # fmt: skip
        return ops.step_from_row(row)

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
        if conversation_items is not None:
            check_conversation_items(conversation_items[1])
        check_events(events)
        params = (ops.dumps_opt(response_payload), ops.dumps_opt(usage), time.time(), upstream, step_id)
        row = await self._run(
            ops.step_write, step_id, ops.COMPLETE, params, COMPLETED, fence, events,
            response_update, conversation_items,
        )  # fmt: skip
        return ops.step_from_row(row)

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
        params = (ops.dumps(error), ops.dumps_opt(response_payload), time.time(), step_id)
        row = await self._run(ops.step_write, step_id, ops.FAIL, params, FAILED, fence, events)
        return ops.step_from_row(row)

    async def cancel_step(
        self, step_id: str, *, fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> Step:  # fmt: skip
        check_events(events)
        row = await self._run(
            ops.step_write, step_id, ops.CANCEL, (time.time(), step_id), CANCELED, fence, events
        )
        return ops.step_from_row(row)

    async def record_attempt(
        self,
        step_id: str,
        error: dict[str, Any] | None,
        upstream: str | None = None,
        *,
        fence: Fence | None = None,
        events: tuple[int, Sequence[bytes]] | None = None,
    ) -> None:
        check_events(events)
        if error is None:
            sql, params = ops.SET_UPSTREAM, (upstream, step_id)
        else:
            sql, params = ops.RECORD_ATTEMPT, (ops.dumps(error), upstream, step_id)
            if isinstance(error.get("id"), str):
                sql, params = ops.RECORD_ATTEMPT_ONCE, (error["id"], *params)
        await self._run(ops.step_write, step_id, sql, params, None, fence, events)

    async def get_step(self, step_id: str) -> Step | None:
        row = await self._fetchone(ops._STEP_SELECT + " WHERE id = %s", (step_id,))
        return None if row is None else ops.step_from_row(row)

    async def list_chain(self, response_id: str, scope_parent: str | None = None) -> list[Step]:
        if scope_parent is None:
            sql = " WHERE response_id = %s AND scope_parent IS NULL ORDER BY sequence"
            params: tuple[Any, ...] = (response_id,)
        else:
            sql = " WHERE response_id = %s AND scope_parent = %s ORDER BY sequence"
            params = (response_id, scope_parent)
        return [ops.step_from_row(r) for r in await self._fetchall(ops._STEP_SELECT + sql, params)]

    async def list_steps(self, response_id: str) -> list[Step]:
        rows = await self._fetchall(
            ops._STEP_SELECT + " WHERE response_id = %s ORDER BY sequence", (response_id,)
        )
        return [ops.step_from_row(r) for r in rows]

    async def list_unfinished_steps(self) -> list[Step]:
        rows = await self._fetchall(
            ops._STEP_SELECT + " WHERE state IN ('pending', 'processing')"
            " ORDER BY created_at, response_id, sequence"
        )
        return [ops.step_from_row(r) for r in rows]

    # -- tools -------------------------------------------------------------------------------

    async def create_tool(self, tool: dict[str, Any]) -> None:
        name = tool.get("name")
        if not isinstance(name, str):
            raise ValueError("a tool definition needs a string 'name'")
        now = time.time()
        await self._rowcount(
            "INSERT INTO tools (name, definition, created_at, updated_at) VALUES (%s, %s, %s, %s)",
            (name, ops.dumps(tool), now, now),
        )

    async def replace_tool(self, name: str, tool: dict[str, Any]) -> None:
        if tool.get("name", name) != name:
            raise ValueError(f"tool name {tool.get('name')!r} does not match {name!r}")
        count = await self._rowcount(
            "UPDATE tools SET definition = %s, updated_at = %s WHERE name = %s",
            (ops.dumps(tool), time.time(), name),
        )
        if count == 0:
            raise StoreNotFoundError(f"tool {name!r} not found")

    async def get_tool(self, name: str) -> dict[str, Any] | None:
        row = await self._fetchone("SELECT definition FROM tools WHERE name = %s", (name,))
        return None if row is None else row[0]

    async def list_tools(self) -> list[dict[str, Any]]:
        return [row[0] for row in await self._fetchall("SELECT definition FROM tools ORDER BY name")]

    async def delete_tool(self, name: str) -> bool:
        return await self._rowcount("DELETE FROM tools WHERE name = %s", (name,)) > 0
