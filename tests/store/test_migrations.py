"""The schemas: exact columns and indexes on a fresh SQLite file, upgrades, no migration twice;
PostgreSQL migrations applied once even by replicas opening together."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from store.migrations import MIGRATION_SET, apply_migrations, migrations
from store.sqlite import SQLiteStore

NAMES = [
    "m001_responses",
    "m002_steps",
    "m003_tools",
    "m004_response_leases",
    "m005_fencing_events_conversations",
    "m006_event_batches",
]

COLUMNS = {
    "responses": {
        "id": "TEXT",
        "model": "TEXT",
        "request": "TEXT",
        "tenant": "TEXT",
        "status": "TEXT",
        "previous_response_id": "TEXT",
        "created_at": "REAL",
        "completed_at": "REAL",
        "output": "TEXT",
        "usage": "TEXT",
        "error": "TEXT",
        "incomplete_details": "TEXT",
        "metadata": "TEXT",
        "store": "INTEGER",
        "owner": "TEXT",
        "lease_expires_at": "REAL",
        "owner_epoch": "INTEGER",
        "cancel_requested": "INTEGER",
    },
    "steps": {
        "id": "TEXT",
        "response_id": "TEXT",
        "scope_parent": "TEXT",
        "prev_step_id": "TEXT",
        "sequence": "INTEGER",
        "kind": "TEXT",
        "state": "TEXT",
        "request_payload": "TEXT",
        "response_payload": "TEXT",
        "error": "TEXT",
        "attempt": "INTEGER",
        "created_at": "REAL",
        "started_at": "REAL",
        "finished_at": "REAL",
        "usage": "TEXT",
        "attempts": "TEXT",
        "upstream": "TEXT",
    },
    "tools": {
        "name": "TEXT",
        "definition": "TEXT",
        "created_at": "REAL",
        "updated_at": "REAL",
    },
    "event_batches": {
        "response_id": "TEXT",
        "last_sequence_number": "INTEGER",
        "first_sequence_number": "INTEGER",
        "sizes": "BLOB",
        "data": "BLOB",
    },
    "conversations": {
        "id": "TEXT",
        "tenant": "TEXT",
        "created_at": "REAL",
        "metadata": "TEXT",
        "last_position": "INTEGER",
    },
    "conversation_items": {
        "conversation_id": "TEXT",
        "position": "INTEGER",
        "id": "TEXT",
        "item": "TEXT",
    },
}


def _open_close(path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(go())


def _applied(path: Path) -> list[str]:
    with sqlite_utils.Database(path) as db:
        return [m.name for m in migrations.applied(db)]


def _assert_schema(db: sqlite_utils.Database) -> None:
    for name, columns in COLUMNS.items():
        table = db.table(name)
        assert {c.name: c.type for c in table.columns} == columns, name
    assert db.table("responses").pks == ["id"]
    assert db.table("steps").pks == ["id"]
    assert db.table("tools").pks == ["name"]
    assert db.table("event_batches").pks == ["response_id", "last_sequence_number"]
    indexes = {tuple(i.columns): i.unique for i in db.table("steps").indexes}
    assert indexes[("response_id", "sequence")] == 1
    assert ("response_id", "scope_parent", "sequence") in indexes
    assert ("state",) in indexes
    fks = db.table("steps").foreign_keys
    assert [(fk.column, fk.other_table, fk.other_column) for fk in fks] == [
        ("response_id", "responses", "id")
    ]


def test_fresh_database_has_exact_columns(tmp_path: Path) -> None:
    with sqlite_utils.Database(tmp_path / "fresh.db") as db:
        assert apply_migrations(db) == NAMES
        _assert_schema(db)
        assert set(db.table_names()) == {*COLUMNS, migrations.migrations_table}


def test_store_open_applies_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    _open_close(path)
    with sqlite_utils.Database(path) as db:
        _assert_schema(db)
        assert db.journal_mode == "wal"


def test_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    _open_close(path)
    _open_close(path)
    _open_close(path)
    assert _applied(path) == NAMES
    with sqlite_utils.Database(path) as db:
        assert apply_migrations(db) == []
        rows = list(db.table(migrations.migrations_table).rows)
    assert [(r["migration_set"], r["name"]) for r in rows] == [(MIGRATION_SET, n) for n in NAMES]


def test_upgrade_from_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite_utils.Database(path) as db:
        migrations.apply(db, stop_before="m003_tools")
        assert "tools" not in db.table_names()
    assert _applied(path) == NAMES[:2]  # stopped before m003
    _open_close(path)
    assert _applied(path) == NAMES
    with sqlite_utils.Database(path) as db:
        _assert_schema(db)


def test_migrations_are_registered_in_order() -> None:
    with sqlite_utils.Database(memory=True) as db:
        assert [m.name for m in migrations.pending(db)] == NAMES


def test_sqlite_upgrade_keeps_rows_and_fills_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite_utils.Database(path) as db:
        migrations.apply(db, stop_before="m005_fencing_events_conversations")
        db.execute(
            "INSERT INTO responses (id, model, request, status, created_at, owner)"
            " VALUES ('resp_old', 'm', '{}', 'in_progress', 1.0, 'A')"
        )
    _open_close(path)
    with sqlite_utils.Database(path) as db:
        row = db.execute(
            "SELECT owner, owner_epoch, cancel_requested FROM responses WHERE id = 'resp_old'"
        ).fetchone()
    assert tuple(row) == ("A", 0, 0)


async def _check_moved_log(store: Any, old: list[bytes]) -> None:
    """``store`` (not yet open) holds ``old`` as response ``resp_old``'s events 0… after its
    migrations: byte-exact, by ``after``/``limit``; a new batch overlapping them is refused,
    one after them appended."""
    from store.types import StoreConflictError

    await store.open()
    try:
        assert await store.list_events("resp_old") == list(enumerate(old))
        assert await store.list_events("resp_old", after=0, limit=1) == [(1, b"")]
        with pytest.raises(StoreConflictError):
            await store.append_events("resp_old", 2, [b"overlaps the last old event"])
        await store.append_events("resp_old", 3, [b"new", b"newer"])
        assert [n for n, _ in await store.list_events("resp_old")] == [0, 1, 2, 3, 4]
    finally:
        await store.close()


def test_sqlite_upgrade_moves_a_per_event_log_into_batches(tmp_path: Path) -> None:
    """A file with m005's one-row-per-event log: every event comes back byte-exact, at its
    sequence number, and new batches append after them (and cannot overlap them)."""
    path = tmp_path / "old.db"
    old = [b"event: a\ndata: {}\n\n", b"", b"\x00\xff binary"]
    with sqlite_utils.Database(path) as db:
        migrations.apply(db, stop_before="m006_event_batches")
        db.execute(
            "INSERT INTO responses (id, model, request, status, created_at)"
            " VALUES ('resp_old', 'm', '{}', 'in_progress', 1.0)"
        )
        db.conn.executemany(
            "INSERT INTO events VALUES ('resp_old', ?, ?)", list(enumerate(old))
        )
        db.conn.commit()

    asyncio.run(_check_moved_log(SQLiteStore(path), old))
    assert _applied(path) == NAMES
    with sqlite_utils.Database(path) as db:
        assert "events" not in db.table_names()


def test_postgres_replicas_opening_together_migrate_once(pg_dsn: str) -> None:
    import psycopg

    from store.postgres import PostgresStore
    from store.postgres_schema import MIGRATIONS

    async def go() -> None:
        stores = [PostgresStore(pg_dsn) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        await asyncio.gather(*(s.close() for s in stores))
        again = PostgresStore(pg_dsn)
        await again.open()
        await again.close()

    asyncio.run(go())
    with psycopg.connect(pg_dsn) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert names == [name for name, _ in MIGRATIONS]
    assert tables == {"schema_migrations", "responses", "steps", "tools", "event_batches",
                      "conversations", "conversation_items", "owners"}  # fmt: skip


def test_postgres_upgrade_from_an_older_schema_keeps_rows(pg_dsn: str) -> None:
    """A database left by a release that knew only the first migration: opening the store
    applies the rest and the old rows stay readable through the store."""
    import psycopg

    from store.postgres import PostgresStore
    from store.postgres_schema import MIGRATIONS

    (first, first_sql), *_ = MIGRATIONS
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        conn.execute(first_sql)  # type: ignore[arg-type]  # constant SQL
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 1.0)", (first,))
        conn.execute(
            "INSERT INTO responses (id, model, request, status, created_at)"
            " VALUES ('resp_old', 'm', '{\"input\": \"hi\"}', 'completed', 1.0)"
        )

    async def go() -> None:
        store = PostgresStore(pg_dsn)
        await store.open()
        try:
            record = await store.get_response("resp_old")
            assert record is not None and record.request == {"input": "hi"}
            assert await store.list_events("resp_old") == []  # the log's table is there
        finally:
            await store.close()

    asyncio.run(go())
    with psycopg.connect(pg_dsn) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]


def test_postgres_upgrade_moves_a_per_event_log_into_batches(pg_dsn: str) -> None:
    """A database with m002's one-row-per-event log: opening the store moves every event into
    ``event_batches`` byte-exact, at its sequence number; new batches append after them and
    cannot overlap them."""
    import psycopg

    from store.postgres import PostgresStore
    from store.postgres_schema import MIGRATIONS

    old = [b"event: a\ndata: {}\n\n", b"", b"\x00\xff binary"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        for name, sql in MIGRATIONS[:4]:  # up to m004_owners: the per-event table
            conn.execute(sql)  # type: ignore[arg-type]  # constant SQL
            conn.execute("INSERT INTO schema_migrations VALUES (%s, 1.0)", (name,))
        conn.execute(
            "INSERT INTO responses (id, model, request, status, created_at)"
            " VALUES ('resp_old', 'm', '{}', 'in_progress', 1.0)"
        )
        for n, data in enumerate(old):
            conn.execute("INSERT INTO events VALUES ('resp_old', %s, %s)", (n, data))

    asyncio.run(_check_moved_log(PostgresStore(pg_dsn), old))
    with psycopg.connect(pg_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )}  # fmt: skip
    assert "events" not in tables and "event_batches" in tables



def test_postgres_upgrade_adds_the_followed_flag(pg_dsn: str) -> None:
    """A database of m005 (before ``responses.followed``): its responses come out unfollowed,
    and a follower's ``wait_events`` marks them."""
    import psycopg

    from store.postgres import PostgresStore
    from store.postgres_schema import MIGRATIONS

    names = [name for name, _ in MIGRATIONS]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        for name, sql in MIGRATIONS[: names.index("m006_followed")]:
            conn.execute(sql)  # type: ignore[arg-type]  # constant SQL
            conn.execute("INSERT INTO schema_migrations VALUES (%s, 1.0)", (name,))
        for rid in ("resp_old", "resp_followed"):
            conn.execute(
                "INSERT INTO responses (id, model, request, status, created_at)"
                " VALUES (%s, 'm', '{}', 'in_progress', 1.0)",
                (rid,),
            )

    async def go() -> None:
        store = PostgresStore(pg_dsn)
        await store.open()
        try:
            await store.wait_events("resp_followed", -1, 0)
        finally:
            await store.close()

    asyncio.run(go())
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT id, followed FROM responses ORDER BY id").fetchall()
        applied = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    assert rows == [("resp_followed", True), ("resp_old", False)]
    assert applied == names
