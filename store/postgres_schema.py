"""The PostgreSQL schema of the step-chain store, as append-only named migrations.

Each migration is ``(name, SQL)`` in :data:`MIGRATIONS`; applied ones are recorded in
``schema_migrations``. :func:`apply_migrations` runs them under a transaction-level advisory
lock, so replicas that start together migrate once (the others wait, then find nothing to do).
Never edit or reorder a migration that has shipped: append a new ``mNNN_<what>`` instead.

Column types: API-visible JSON (requests, outputs, payloads, usage, metadata, tool definitions,
conversation items) is ``json``, which keeps the text exactly as written (key order included);
``jsonb`` only where the database edits it (``steps.attempts``). Streamed events are ``bytea``,
byte-exact. Timestamps are ``double precision`` Unix seconds (UTC), as on SQLite.
"""

from __future__ import annotations

import time

import psycopg

__all__ = ["MIGRATIONS", "apply_migrations", "MIGRATION_LOCK_KEY"]

#: The advisory lock key migrations run under (an arbitrary constant: "stepchain" in ASCII).
MIGRATION_LOCK_KEY = 0x73746570636861

MIGRATIONS: list[tuple[str, str]] = [
    (
        "m001_responses_steps_tools",
        """
        CREATE TABLE responses (
            id text PRIMARY KEY,
            model text NOT NULL,
            request json NOT NULL,
            tenant text,
            status text NOT NULL,
            previous_response_id text,
            created_at double precision NOT NULL,
            completed_at double precision,
            output json NOT NULL DEFAULT '[]',
            usage json,
            error json,
            incomplete_details json,
            metadata json,
            store boolean NOT NULL DEFAULT true,
            owner text,
            owner_epoch bigint NOT NULL DEFAULT 0,
            cancel_requested boolean NOT NULL DEFAULT false,
            lease_expires_at double precision,
            last_sequence bigint NOT NULL DEFAULT 0
        );
        CREATE INDEX responses_status_created ON responses (status, created_at);
        CREATE INDEX responses_status_lease ON responses (status, lease_expires_at);
        CREATE INDEX responses_created_id ON responses (created_at DESC, id DESC);
        CREATE TABLE steps (
            id text PRIMARY KEY,
            response_id text NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
            scope_parent text,
            prev_step_id text,
            sequence bigint NOT NULL,
            kind text NOT NULL,
            state text NOT NULL,
            request_payload json NOT NULL,
            response_payload json,
            error json,
            attempt integer NOT NULL DEFAULT 0,
            created_at double precision NOT NULL,
            started_at double precision,
            finished_at double precision,
            usage json,
            attempts jsonb NOT NULL DEFAULT '[]',
            upstream text,
            UNIQUE (response_id, sequence)
        );
        CREATE INDEX steps_scope ON steps (response_id, scope_parent, sequence);
        CREATE INDEX steps_unfinished ON steps (created_at)
            WHERE state IN ('pending', 'processing');
        CREATE TABLE tools (
            name text PRIMARY KEY,
            definition json NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL
        );
        """,
    ),
    (
        "m002_events",
        """
        CREATE TABLE events (
            response_id text NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
            sequence_number bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (response_id, sequence_number)
        );
        """,
    ),
    (
        "m003_conversations",
        """
        CREATE TABLE conversations (
            id text PRIMARY KEY,
            tenant text,
            created_at double precision NOT NULL,
            metadata json NOT NULL DEFAULT '{}',
            last_position bigint NOT NULL DEFAULT 0
        );
        CREATE TABLE conversation_items (
            conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position bigint NOT NULL,
            id text NOT NULL,
            item json NOT NULL,
            PRIMARY KEY (conversation_id, position),
            UNIQUE (conversation_id, id)
        );
        """,
    ),
    (
        "m004_owners",
        """
        CREATE TABLE owners (
            owner text PRIMARY KEY,
            registered_at double precision NOT NULL
        );
        """,
    ),
    (
        # One row per write instead of one per event (store/event_log.py); stored events move
        # over one per row, sizes as 4-byte big-endian lengths (int4send).
        "m005_event_batches",
        """
        CREATE TABLE event_batches (
            response_id text NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
            last_sequence_number bigint NOT NULL,
            first_sequence_number bigint NOT NULL,
            sizes bytea NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (response_id, last_sequence_number)
        );
        INSERT INTO event_batches
            SELECT response_id, sequence_number, sequence_number,
                   int4send(octet_length(data)), data FROM events;
        DROP TABLE events;
        """,
    ),
    (
        # Set by a follower's first wait_events; a write NOTIFYs a response's events only when
        # its row, read under the write's lock, has it (store.postgres_ops). Never cleared.
        "m006_followed",
        "ALTER TABLE responses ADD COLUMN followed boolean NOT NULL DEFAULT false;",
    ),
]


async def apply_migrations(conn: psycopg.AsyncConnection) -> list[str]:
    """Apply every pending migration in one transaction; return the names applied.

    ``conn`` must be in autocommit mode. Raises ``psycopg.Error``; on error nothing is applied.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (name text PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        cursor = await conn.execute("SELECT name FROM schema_migrations")
        applied = {row[0] for row in await cursor.fetchall()}
        done = []
        for name, sql in MIGRATIONS:
            if name in applied:
                continue
            await conn.execute(sql)  # type: ignore[arg-type]  # constant SQL, no parameters
            await conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES (%s, %s)",
                (name, time.time()),
            )
            done.append(name)
    return done
