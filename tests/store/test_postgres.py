"""PostgreSQL-only behaviour: start-up errors that name the server but never the password, the
server going away and coming back at run time, and ``open_store`` picking the backend by URL."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from store import open_store
from store.postgres import PostgresStore
from store.sqlite import SQLiteStore
from store.types import ResponseRecord, StoreError, StoreUnavailableError, new_id
from tests.pg import PASSWORD_ROLE, PgServer, _free_port
from tests.store.helpers import run


def _record() -> ResponseRecord:
    return ResponseRecord(id=new_id("resp"), model="m", request={}, created_at=time.time())


def test_open_store_picks_the_backend_by_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(open_store(str(tmp_path / "a.db")), SQLiteStore)
    assert open_store(f"sqlite:///{tmp_path}/b.db").path == f"{tmp_path}/b.db"  # type: ignore[attr-defined]
    assert open_store("sqlite:///rel.db").path == "rel.db"  # type: ignore[attr-defined]
    assert open_store("x.db", synchronous="FULL")._synchronous == "FULL"  # type: ignore[attr-defined]
    for url in ("postgresql://u:pw@db.example:6543/app", "postgres://u@db.example/app"):
        store = open_store(url, synchronous="FULL")  # SQLite's option is ignored here
        assert isinstance(store, PostgresStore) and "pw" not in repr(store)
    assert open_store("postgresql://u:pw@db.example:6543/app").where == "db.example:6543/app"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="'mysql'") as info:
        open_store("mysql://root:hunter2@db/app")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError):
        open_store("sqlite://")


def test_redact_url_hides_every_form_of_password() -> None:
    from store import redact_url

    for url in ("postgresql://u:s3cret@h:5432/db", "postgresql://u@h/db?password=s3cret&sslmode=require",
                "postgresql://u@h/db?sslmode=require&PASSWORD=s3cret", "host=h password=s3cret dbname=x",
                "host=h password='s3cret and more' dbname=x"):  # fmt: skip
        shown = redact_url(url)
        assert "s3cret" not in shown and "***" in shown, shown
    assert redact_url("postgresql://u@h/db?sslmode=require") == "postgresql://u@h/db?sslmode=require"
    assert redact_url("/var/lib/password=x/stepchain.db") == "/var/lib/password=x/stepchain.db"


def test_unreachable_server_at_open_names_it_without_the_password() -> None:
    port = _free_port()  # nothing listens there
    store = PostgresStore(f"postgresql://app:s3cret-pw@127.0.0.1:{port}/appdb", connect_timeout_s=2)
    with pytest.raises(StoreUnavailableError) as info:
        run(store.open())
    message = str(info.value)
    assert f"127.0.0.1:{port}/appdb" in message and "s3cret-pw" not in message
    assert "\n" not in message
    with pytest.raises(StoreError, match="not open"):
        run(store.get_response("resp_x"))


def test_wrong_password_and_unknown_database_at_open(pg_server: PgServer, pg_dsn: str) -> None:
    if not pg_server.managed:
        pytest.skip("needs the test-managed server (a role with password logins)")
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_ROLE,)).fetchone()
        if not exists:
            conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right-pw'")
    port = psycopg.conninfo.conninfo_to_dict(pg_dsn)["port"]
    for url, where in (
        (f"postgresql://{PASSWORD_ROLE}:wrong-pw@127.0.0.1:{port}/postgres", f"127.0.0.1:{port}/postgres"),
        (f"postgresql://postgres:any-pw@127.0.0.1:{port}/no_such_db", f"127.0.0.1:{port}/no_such_db"),
    ):
        with pytest.raises(StoreUnavailableError) as info:
            run(PostgresStore(url).open())
        message = str(info.value)
        assert where in message and "pw" not in message.replace(PASSWORD_ROLE, ""), message


def test_server_going_away_and_coming_back(pg_server: PgServer, pg_dsn: str) -> None:
    if not pg_server.managed:
        pytest.skip("needs the test-managed server (it is stopped and started)")
    store = PostgresStore(pg_dsn, pool_timeout_s=2, connect_timeout_s=2)
    follower = PostgresStore(pg_dsn, pool_timeout_s=2, connect_timeout_s=2)

    async def main() -> list[float]:
        await store.open()
        await follower.open()
        kept = _record()
        await store.create_response(kept, events=(0, [b"e0"]))
        await store.register_owner("proc-outage")
        assert await _owner_lock_held("proc-outage")
        pg_server.stop()
        took = []
        lost = _record()
        for call in (
            store.get_response(kept.id),
            store.create_response(lost),
            store.append_events(kept.id, 1, [b"lost"]),
            store.get_response(kept.id),
        ):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError) as info:
                await asyncio.wait_for(call, 60)  # promptly: never a hang
            took.append(time.monotonic() - t0)
            assert pg_dsn.split("@")[1].split("/")[0] in str(info.value)
        pg_server.start()
        deadline = time.monotonic() + 60
        while True:  # the pool reconnects: calls work again
            try:
                got = await store.get_response(kept.id)
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert got is not None and got.id == kept.id
        assert await store.get_response(lost.id) is None  # the writes that raised wrote nothing
        assert await store.list_events(kept.id) == [(0, b"e0")]
        await store.create_response(lost)
        # The follower's LISTEN connection comes back too: wake-ups work again.
        waiting = asyncio.ensure_future(follower.wait_events(kept.id, 0, 60))
        await asyncio.sleep(0.1)
        await store.append_events(kept.id, 1, [b"e1"])
        await asyncio.wait_for(waiting, 60)
        assert await follower.list_events(kept.id, after=0) == [(1, b"e1")]
        # The owner's liveness lock died with the server's sessions; the store takes it again.
        deadline = time.monotonic() + 60
        while not await _owner_lock_held("proc-outage"):
            assert time.monotonic() < deadline, "the owner lock was not taken again"
            await asyncio.sleep(0.2)
        return took

    async def _owner_lock_held(owner: str) -> bool:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            cursor = await conn.execute(
                "SELECT EXISTS(SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0))",
                (owner,),
            )
            row = await cursor.fetchone()
            return bool(row and row[0])

    try:
        took = run(main())
    finally:
        run(store.close())
        run(follower.close())
    print("StoreUnavailableError after (s):", [round(t, 2) for t in took])


def test_json_key_order_is_kept(pg_dsn: str) -> None:
    """``json`` columns keep the text as written: the Response objects built from them show keys
    in the order the gateway wrote them (jsonb would reorder them)."""
    store = PostgresStore(pg_dsn)

    async def main() -> None:
        await store.open()
        try:
            record = _record()
            record.request = {"zeta": 1, "alpha": {"y": 2, "b": 3}, "mid": [1, {"k2": 0, "k1": 1}]}
            record.metadata = {"z": "1", "a": "2"}
            await store.create_response(record)
            got = await store.get_response(record.id)
            assert got is not None
            assert list(got.request) == ["zeta", "alpha", "mid"]
            assert list(got.request["alpha"]) == ["y", "b"]
            assert list(got.metadata or {}) == ["z", "a"]
        finally:
            await store.close()

    run(main())


def test_appends_of_one_loop_turn_share_a_statement_and_keep_their_own_errors(pg_dsn: str) -> None:
    """Appends made together (the flushes of concurrent streams, store.postgres_appends): the
    good ones are stored and wake followers; a stale fence, an overlap and an unknown response
    each get their own error and write nothing — whether they share the statement or not."""
    from store.types import Fence, FencedError, StoreConflictError, StoreNotFoundError

    async def go() -> None:
        store, follower = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
        await store.open()
        await follower.open()
        try:
            records = [_record() for _ in range(6)]
            for record in records:
                await store.create_response(record, owner="A", lease_s=60, events=(0, [b"e0"]))
            stored = await store.get_response(records[0].id)
            assert stored is not None
            fence = Fence("A", stored.owner_epoch)
            good = records[:4]
            stale, overlapped = records[4], records[5]
            woken = asyncio.ensure_future(follower.wait_events(good[3].id, 0, 10))
            await asyncio.sleep(0.05)  # it is waiting
            results = await asyncio.gather(
                *(store.append_events(r.id, 1, [b"e1", f"e2 {r.id}".encode()], fence=fence) for r in good),
                store.append_events(stale.id, 1, [b"late"], fence=Fence("A", fence.epoch + 1)),
                store.append_events(overlapped.id, 0, [b"again"]),
                store.append_events("resp_unknown", 0, [b"x"]),
                return_exceptions=True,
            )
            assert results[:4] == [None] * 4
            assert [type(e) for e in results[4:]] == [FencedError, StoreConflictError, StoreNotFoundError]
            for record in good:
                assert await store.list_events(record.id) == [
                    (0, b"e0"), (1, b"e1"), (2, f"e2 {record.id}".encode())
                ]
            for record in (stale, overlapped):
                assert await store.list_events(record.id) == [(0, b"e0")]
            await asyncio.wait_for(woken, 5)  # its NOTIFY reached the other store's listener
            # Without a bad one, all of them go in one statement: still exact.
            await asyncio.gather(*(store.append_events(r.id, 3, [b"e3"], fence=fence) for r in good))
            for record in good:
                assert [n for n, _ in await follower.list_events(record.id)] == [0, 1, 2, 3]
        finally:
            woken.cancel()
            await follower.close()
            await store.close()

    run(go())


def test_a_single_append_survives_its_prepared_statement_being_dropped(pg_dsn: str) -> None:
    """The single append is prepared once per pooled connection under its own name
    (store.postgres_appends.append_one); a session that lost it (``DEALLOCATE ALL``, as a
    pooler's reset does) prepares it again and stores the batch once."""
    from store.types import Fence

    async def go() -> None:
        store = PostgresStore(pg_dsn, min_size=1, max_size=1)  # one session for everything
        await store.open()
        try:
            record = _record()
            await store.create_response(record, owner="A", lease_s=60, events=(0, [b"e0"]))
            stored = await store.get_response(record.id)
            assert stored is not None
            fence = Fence("A", stored.owner_epoch)
            assert store._pool is not None

            async def prepared() -> list[str]:
                async with store._pool.connection() as conn:  # type: ignore[union-attr]
                    cursor = await conn.execute("SELECT name FROM pg_prepared_statements")
                    return [row[0] for row in await cursor.fetchall()]

            await store.append_events(record.id, 1, [b"e1"], fence=fence)
            assert "stepchain_append_1" in await prepared()
            async with store._pool.connection() as conn:
                await conn.execute("DEALLOCATE ALL")
            assert "stepchain_append_1" not in await prepared()
            await store.append_events(record.id, 2, [b"e2", b"e3"], fence=fence)
            assert "stepchain_append_1" in await prepared()
            assert await store.list_events(record.id) == [(0, b"e0"), (1, b"e1"), (2, b"e2"), (3, b"e3")]
        finally:
            await store.close()

    run(go())
