"""PostgreSQL NOTIFYs a response's events only while someone follows it: writes of a response
nobody waits for send nothing on ``stepchain_events``; once another store object (a second
replica) called ``wait_events`` for it, every write that stores events or changes its status
NOTIFYs, and such a follower is woken by them alone (store/postgres_ops.py)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from store import postgres_appends
from store.postgres import PostgresStore
from store.postgres_ops import EVENTS_CHANNEL
from store.types import ConversationRecord, Fence, ResponseRecord, StepDescriptor, new_id
from tests.store.helpers import run

_MODEL_CALL = StepDescriptor("model_call", {"model": "m", "messages": []})


@asynccontextmanager
async def _stores(dsn: str, **kwargs: Any) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """A writer and a follower: two store objects, each with its own pool and LISTEN."""
    writer, follower = PostgresStore(dsn, **kwargs), PostgresStore(dsn, **kwargs)
    await writer.open()
    await follower.open()
    try:
        yield writer, follower
    finally:
        await follower.close()
        await writer.close()


@asynccontextmanager
async def _listening(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A raw connection LISTENing on the events channel."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
        yield conn


@dataclass
class _Target:
    """A response owned by "A" (event 0 stored), ``steps`` processing steps of it, a sibling
    response (the same) and a conversation: what the writes below need, made before them."""

    id: str
    fence: Fence
    steps: list[str]
    sibling: str
    conversation: str


async def _create(store: PostgresStore, steps: int = 0) -> _Target:
    records = [
        ResponseRecord(id=new_id("resp"), model="m", request={}, created_at=time.time())
        for _ in range(2)
    ]
    for record in records:
        await store.create_response(record, owner="A", lease_s=60, events=(0, [b"e0"]))
    stored = await store.get_response(records[0].id)
    assert stored is not None
    fence = Fence("A", stored.owner_epoch)  # the sibling's too: both new
    made = await store.record_steps(stored.id, None, None, [_MODEL_CALL] * steps, start=True, fence=fence)
    conversation = ConversationRecord(id=new_id("conv"))
    await store.create_conversation(conversation)
    return _Target(stored.id, fence, [step.id for step in made], records[1].id, conversation.id)


async def _notified(listener: psycopg.AsyncConnection[Any], dsn: str) -> list[str]:
    """The payloads ``listener`` received on the events channel since the last call. A marker
    NOTIFY sent now comes after every notification of a transaction committed before it."""
    marker = new_id("marker")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, marker))
    payloads = []
    async with aclosing(listener.notifies(timeout=10)) as notes:
        async for note in notes:
            if note.payload == marker:
                return payloads
            payloads.append(note.payload)
    raise AssertionError(f"the marker NOTIFY did not arrive (got {payloads})")


# Each is one write to the target, its n-th (n = 1, 2; events get sequence number n).
_Write = Callable[[PostgresStore, _Target, int], Awaitable[Any]]


async def _append(s: PostgresStore, t: _Target, n: int) -> None:
    await s.append_events(t.id, n, [b"e%d" % n], fence=t.fence)


async def _group_append(s: PostgresStore, t: _Target, n: int) -> None:
    """With the sibling's in the same loop turn: one statement (store.postgres_appends)."""
    await asyncio.gather(_append(s, t, n), s.append_events(t.sibling, n, [b"s"], fence=t.fence))


async def _step_events(s: PostgresStore, t: _Target, n: int) -> None:
    await s.record_attempt(t.steps[n - 1], None, "u", fence=t.fence, events=(n, [b"e"]))


async def _step_status(s: PostgresStore, t: _Target, n: int) -> None:
    await s.complete_step(t.steps[n - 1], {}, response_update={"status": "in_progress"}, fence=t.fence)


async def _record_steps_events(s: PostgresStore, t: _Target, n: int) -> None:
    await s.record_steps(t.id, None, None, [_MODEL_CALL], fence=t.fence, events=(n, [b"e"]))


async def _status(s: PostgresStore, t: _Target, n: int) -> None:
    await s.update_response(t.id, fence=t.fence, status="in_progress")


def _items(t: _Target, n: int) -> tuple[str, list[dict[str, Any]]]:
    return t.conversation, [{"id": f"item_{n}", "type": "message"}]


async def _status_with_items(s: PostgresStore, t: _Target, n: int) -> None:
    await s.update_response(t.id, fence=t.fence, status="in_progress", conversation_items=_items(t, n))


async def _step_events_with_items(s: PostgresStore, t: _Target, n: int) -> None:
    await s.complete_step(
        t.steps[n - 1], {}, fence=t.fence, events=(n, [b"e"]), conversation_items=_items(t, n)
    )


WRITES = [
    pytest.param(_append, id="append"),
    pytest.param(_group_append, id="group-append"),
    pytest.param(_step_events, id="step-write-with-events"),
    pytest.param(_step_status, id="step-write-with-status"),
    pytest.param(_record_steps_events, id="record-steps-with-events"),
    pytest.param(_status, id="update-response-status"),
    pytest.param(_status_with_items, id="update-response-status-with-items"),
    pytest.param(_step_events_with_items, id="step-write-with-events-and-items"),
]


@pytest.mark.parametrize("write", WRITES)
def test_writes_notify_only_once_the_response_is_followed(pg_dsn: str, write: _Write) -> None:
    async def go() -> None:
        async with _stores(pg_dsn) as (writer, follower), _listening(pg_dsn) as listener:
            target = await _create(writer, steps=2)
            await write(writer, target, 1)
            assert await _notified(listener, pg_dsn) == []
            await follower.wait_events(target.id, 10**9, 0)  # a follower on another replica
            await write(writer, target, 2)
            assert await _notified(listener, pg_dsn) == [target.id]

    run(go())


@pytest.mark.parametrize("write", WRITES)
def test_a_write_that_waited_for_the_followers_mark_notifies(pg_dsn: str, write: _Write) -> None:
    """The follower's UPDATE holds the row when the write starts: the write, whose snapshot is
    older than that UPDATE's commit, reads the flag under its lock at its newest version."""

    async def go() -> None:
        async with _stores(pg_dsn) as (writer, _), _listening(pg_dsn) as listener:
            target = await _create(writer, steps=1)
            async with await psycopg.AsyncConnection.connect(pg_dsn) as follower:
                await follower.execute(
                    "UPDATE responses SET followed = true WHERE id = %s", (target.id,)
                )
                writing = asyncio.ensure_future(write(writer, target, 1))
                await _until_waiting_for_a_lock(pg_dsn)
                await follower.commit()
            await asyncio.wait_for(writing, 10)
            assert await _notified(listener, pg_dsn) == [target.id]

    run(go())


def test_a_write_holding_the_row_delays_the_followers_first_check(pg_dsn: str) -> None:
    """A write that locked the response before the follower marked it (and so does not NOTIFY):
    the follower's mark waits for its commit, and its readiness check then sees the events."""

    async def go() -> None:
        async with _stores(pg_dsn, poll_s=60.0) as (writer, follower):
            target = await _create(writer)
            async with await psycopg.AsyncConnection.connect(pg_dsn) as other:
                await other.execute("SELECT 1 FROM responses WHERE id = %s FOR SHARE", (target.id,))
                await other.execute(
                    "INSERT INTO event_batches VALUES (%s, 1, 1, int4send(2), 'e1')", (target.id,)
                )
                t0 = time.monotonic()
                waiting = asyncio.ensure_future(follower.wait_events(target.id, 0, 10))
                await _until_waiting_for_a_lock(pg_dsn)
                await other.commit()
            await asyncio.wait_for(waiting, 10)
            assert time.monotonic() - t0 < 5
            assert await follower.list_events(target.id, after=0) == [(1, b"e1")]

    run(go())


async def _until_waiting_for_a_lock(dsn: str) -> None:
    """Until a session of the database waits for a row lock."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            row = await cursor.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("nobody waits for a lock")


def test_an_unfenced_step_write_notifies_anyway(pg_dsn: str) -> None:
    """It does not lock the response row, so it cannot tell whether it is followed."""

    async def go() -> None:
        async with _stores(pg_dsn) as (writer, _), _listening(pg_dsn) as listener:
            target = await _create(writer, steps=1)
            await writer.record_attempt(target.steps[0], None, "u", events=(1, [b"e1"]))
            assert await _notified(listener, pg_dsn) == [target.id]

    run(go())


def test_a_group_append_notifies_only_the_followed_responses(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = []
    append_many = postgres_appends._append_many

    async def counted(conn: Any, appends: list[Any]) -> set[str]:
        statements.append(len(appends))
        return await append_many(conn, appends)

    monkeypatch.setattr(postgres_appends, "_append_many", counted)

    async def go() -> None:
        async with _stores(pg_dsn) as (writer, follower), _listening(pg_dsn) as listener:
            targets = [await _create(writer) for _ in range(3)]

            async def append_all(n: int) -> None:  # in one loop turn: one statement
                await asyncio.gather(*(_append(writer, target, n) for target in targets))

            await append_all(1)
            assert await _notified(listener, pg_dsn) == []
            followed = targets[1].id
            await follower.wait_events(followed, 10**9, 0)
            await append_all(2)
            assert await _notified(listener, pg_dsn) == [followed]
            assert statements == [3, 3]
            for target in targets:
                assert [n for n, _ in await follower.list_events(target.id)] == [0, 1, 2]

    run(go())


def test_a_follower_on_another_store_is_woken_by_notify_alone(pg_dsn: str) -> None:
    """Polling off (LISTEN up; ``poll_s`` long anyway): each wait ends on an append's NOTIFY,
    well before its timeout, also when the follower's first wait overlaps the appends."""
    timeout_s, events = 10.0, 5

    async def follow(store: PostgresStore, rid: str) -> list[float]:
        took, after = [], 0
        while after < events:
            t0 = time.monotonic()
            await store.wait_events(rid, after, timeout_s)
            took.append(time.monotonic() - t0)
            after = (await store.list_events(rid))[-1][0]
        return took

    async def append(store: PostgresStore, target: _Target) -> None:
        for n in range(1, events + 1):
            await asyncio.sleep(random.uniform(0, 0.01))
            await _append(store, target, n)

    async def go() -> None:
        async with _stores(pg_dsn, poll_s=60.0) as (writer, follower):
            for _ in range(8):
                target = await _create(writer)
                took, _ = await asyncio.gather(follow(follower, target.id), append(writer, target))
                assert max(took) < timeout_s / 2, took

    run(go())


def test_a_follower_marks_a_response_once_and_an_unknown_one_not_at_all(pg_dsn: str) -> None:
    """The store remembers the responses it marked (repeated waits send no UPDATE); a response
    that did not exist yet when waited for is marked once it does."""

    async def followed(store: PostgresStore, rid: str) -> bool:
        row = await store._fetchone("SELECT followed FROM responses WHERE id = %s", (rid,))
        return bool(row and row[0])

    async def go() -> None:
        async with _stores(pg_dsn) as (writer, follower):
            rid = (await _create(writer)).id
            assert not await followed(writer, rid)
            await follower.wait_events(rid, 10**9, 0)
            assert await followed(writer, rid)
            await writer._rowcount("UPDATE responses SET followed = false WHERE id = %s", (rid,))
            await follower.wait_events(rid, 10**9, 0)
            assert not await followed(writer, rid)  # remembered: not written again

            later = ResponseRecord(id=new_id("resp"), model="m", request={}, created_at=time.time())
            await follower.wait_events(later.id, 10**9, 0)  # not there yet: ends at once
            await writer.create_response(later, owner="A", lease_s=60)
            await follower.wait_events(later.id, 10**9, 0)
            assert await followed(writer, later.id)

    run(go())
