"""The SQLite schema of the step-chain store, as append-only named migrations.

Each migration is a small function registered on :data:`migrations` (a sqlite-utils
``Migrations`` set named ``"stepchain"``); applied ones are recorded in ``_sqlite_migrations``.
Never edit or reorder a migration that has shipped: append a new ``mNNN_<what>`` instead.

JSON columns are TEXT holding orjson output; timestamps are REAL Unix seconds (UTC).
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

__all__ = ["MIGRATION_SET", "apply_migrations", "migrations"]

MIGRATION_SET = "stepchain"

migrations = Migrations(MIGRATION_SET)


@migrations()
def m001_responses(db: Database) -> None:
    """One row per ``POST /v1/responses`` (:class:`store.types.ResponseRecord`)."""
    table = db.table("responses")
    table.create(
        {
            "id": str,
            "model": str,
            "request": str,  # JSON: the whole original request body
            "tenant": str,
            "status": str,
            "previous_response_id": str,
            "created_at": float,
            "completed_at": float,
            "output": str,  # JSON list of output items
            "usage": str,  # JSON
            "error": str,  # JSON
            "incomplete_details": str,  # JSON
            "metadata": str,  # JSON
            "store": int,  # 0/1
        },
        pk="id",
        not_null={"model", "request", "status", "created_at", "output", "store"},
        defaults={"output": "[]", "store": 1},
    )
    # Recovery lists responses by status, oldest first.
    table.create_index(["status", "created_at"])


@migrations()
def m002_steps(db: Database) -> None:
    """One row per model call or tool call (:class:`store.types.Step`)."""
    table = db.table("steps")
    table.create(
        {
            "id": str,
            "response_id": str,
            "scope_parent": str,
            "prev_step_id": str,
            "sequence": int,
            "kind": str,
            "state": str,
            "request_payload": str,  # JSON
            "response_payload": str,  # JSON, NULL when None
            "error": str,  # JSON {"type", "message"}
            "attempt": int,
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "usage": str,  # JSON, Chat Completions usage
            "attempts": str,  # JSON list of per-attempt errors
            "upstream": str,
        },
        pk="id",
        foreign_keys=[("response_id", "responses", "id")],
        not_null={
            "response_id",
            "sequence",
            "kind",
            "state",
            "request_payload",
            "attempt",
            "created_at",
            "attempts",
        },
        defaults={"attempt": 0, "attempts": "[]"},
    )
    # Sequences are per response and never reused; also serves list_steps' ordering.
    table.create_index(["response_id", "sequence"], unique=True)
    table.create_index(["response_id", "scope_parent", "sequence"])
    table.create_index(["state"])


@migrations()
def m003_tools(db: Database) -> None:
    """Registered tool definitions, keyed by name."""
    db.table("tools").create(
        {"name": str, "definition": str, "created_at": float, "updated_at": float},
        pk="name",
        not_null={"definition", "created_at", "updated_at"},
    )


@migrations()
def m004_response_leases(db: Database) -> None:
    """Which process runs a response, until when: lets a live process resume a dead one's work."""
    table = db.table("responses")
    table.add_column("owner", str)
    table.add_column("lease_expires_at", float)
    table.create_index(["status", "lease_expires_at"])


@migrations()
def m005_fencing_events_conversations(db: Database) -> None:
    """Fencing epochs and cancel flags on responses; the durable event log; conversations;
    registered owners (liveness)."""
    table = db.table("responses")
    table.add_column("owner_epoch", int, not_null_default=0)
    table.add_column("cancel_requested", int, not_null_default=0)
    table.create_index(["created_at", "id"])
    db.execute(
        "CREATE TABLE events (response_id TEXT NOT NULL, sequence_number INTEGER NOT NULL,"
        " data BLOB NOT NULL, PRIMARY KEY (response_id, sequence_number)) WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, tenant TEXT, created_at REAL NOT NULL,"
        " metadata TEXT NOT NULL DEFAULT '{}', last_position INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "CREATE TABLE conversation_items (conversation_id TEXT NOT NULL, position INTEGER NOT NULL,"
        " id TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (conversation_id, position),"
        " UNIQUE (conversation_id, id)) WITHOUT ROWID"
    )


@migrations()
def m006_event_batches(db: Database) -> None:
    """The durable event log as one row per write (:mod:`store.event_log`) instead of one per
    event; the stored events move over unchanged, one per row."""
    db.execute(
        "CREATE TABLE event_batches (response_id TEXT NOT NULL,"
        " last_sequence_number INTEGER NOT NULL, first_sequence_number INTEGER NOT NULL,"
        " sizes BLOB NOT NULL, data BLOB NOT NULL,"
        " PRIMARY KEY (response_id, last_sequence_number))"
    )  # a rowid table: its rows (several KB) stay out of the key's b-tree
    db.conn.create_function("stepchain_size", 1, lambda data: len(data).to_bytes(4, "big"))
    db.execute(
        "INSERT INTO event_batches SELECT response_id, sequence_number, sequence_number,"
        " stepchain_size(data), data FROM events"
    )
    db.execute("DROP TABLE events")


def apply_migrations(db: Database) -> list[str]:
    """Apply every pending migration; return the names applied (empty if none were pending).

    Runs under one ``BEGIN IMMEDIATE`` write lock so two processes opening the same fresh file
    cannot both apply a migration; each migration nests as a savepoint. Raises ``sqlite3.Error``.
    """
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        pending = [m.name for m in migrations.pending(db)]
        migrations.apply(db)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return pending
