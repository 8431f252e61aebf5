"""Streams survive disconnects: re-attach with starting_after, replay stored responses,
background responses followed and cancelled — through the real openai SDK."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest

from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import gateway_on, running_gateway

# SDK round trips, streaming, tools and resilience on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
TEXT = "".join(f"piece{i} " for i in range(40))


def test_reattach_after_a_disconnect_gets_exactly_the_missing_events(tmp_path):
    with running_gateway(tmp_path) as gw:
        gw.model.replies.append(Reply(content=TEXT, chunk_size=6, chunk_delay_s=0.02))
        client = gw.client()
        before = []
        stream = client.responses.create(model=MODEL, input="x", stream=True)
        for event in stream:
            before.append(event)
            if event.type == "response.output_text.delta" and len(before) > 6:
                break
        stream.close()  # the connection drops mid-response
        last_seen = before[-1].sequence_number
        response_id = before[0].response.id
        after = list(client.responses.retrieve(response_id, stream=True, starting_after=last_seen))
    events = before + after
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == TEXT == events[-1].response.output_text


def test_a_stored_response_replays_as_a_stream_from_another_process(tmp_path):
    with running_gateway(tmp_path) as gw:
        gw.model.replies.append(Reply(content="stored answer", reasoning="hmm"))
        created = gw.client().responses.create(model=MODEL, input="x")
        upstream = f"{gw.upstream_url}/v1"
    with gateway_on(gw.db, upstream) as (url, _):
        import openai

        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            events = list(client.responses.retrieve(created.id, stream=True))
            tail = list(client.responses.retrieve(created.id, stream=True, starting_after=len(events) - 3))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[-1].response.model_dump() == created.model_dump()
    assert [e.sequence_number for e in tail] == [len(events) - 2, len(events) - 1]


def test_background_response_followed_then_retrieved(tmp_path):
    with running_gateway(tmp_path) as gw:
        gw.model.replies.append(Reply(content="background work done", chunk_size=4, chunk_delay_s=0.01))
        client = gw.client()
        started = client.responses.create(model=MODEL, input="x", background=True)
        assert started.status in ("queued", "in_progress")
        events = list(client.responses.retrieve(started.id, stream=True))
        assert events[-1].type == "response.completed"
        assert client.responses.retrieve(started.id).output_text == "background work done"


def test_cancel_a_background_response(tmp_path):
    with running_gateway(tmp_path) as gw:
        gw.model.replies.append(Reply(content=TEXT * 5, chunk_size=3, chunk_delay_s=0.05))
        client = gw.client()
        started = client.responses.create(model=MODEL, input="x", background=True)
        deadline = time.monotonic() + 10
        while not gw.model.requests:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancelled = client.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        steps = httpx.get(f"{gw.url}/v1/responses/{started.id}/steps").json()["data"]
        assert [s["state"] for s in steps] == ["canceled"]
        assert client.responses.retrieve(started.id).status == "cancelled"
        # A non-background response cannot be cancelled.
        gw.model.replies.append(Reply(content="done"))
        plain = client.responses.create(model=MODEL, input="y")
        with httpx.Client() as http:
            refused = http.post(f"{gw.url}/v1/responses/{plain.id}/cancel")
        assert refused.status_code == 400


class WriteLock:
    """The database's write lock, held from the test's own connection: SQLite's ``BEGIN
    IMMEDIATE``; on PostgreSQL an ``EXCLUSIVE`` lock on ``steps`` (reads go on, writes wait)."""

    def __init__(self, db: str) -> None:
        self.pg = db.startswith("postgresql://")
        if self.pg:
            self.conn: Any = psycopg.connect(db)
        else:
            self.conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self.db = db

    def take(self) -> None:
        self.conn.execute("LOCK TABLE steps IN EXCLUSIVE MODE" if self.pg else "BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.rollback() if self.pg else self.conn.execute("ROLLBACK")

    def step_state(self, response_id: str) -> str:
        """The response's one step's state, read on a connection of its own."""
        if self.pg:
            with psycopg.connect(self.db) as conn:
                row = conn.execute("SELECT state FROM steps WHERE response_id = %s", (response_id,))
                return row.fetchone()[0]
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            sql = "SELECT state FROM steps WHERE response_id = ?"
            return conn.execute(sql, (response_id,)).fetchone()[0]

    def close(self) -> None:
        self.conn.close()


def test_a_done_event_never_describes_a_step_the_store_lacks(tmp_path):
    """The last model call is stored with the response's result in one write, and its ``*.done``
    events wait for that write. The test holds the database's write lock from its own connection
    for a second from the first delta on: the stream must not show ``response.output_item.done``
    until the lock is gone and the step is ``completed`` in the database."""
    with running_gateway(tmp_path) as gw:
        # About a second of deltas: the last write cannot have started when the lock is taken
        # (PostgreSQL writes are slower than SQLite's, and deltas reach clients once stored).
        gw.model.replies.append(Reply(content="one two three four " * 5, chunk_size=4, chunk_delay_s=0.04))
        lock = WriteLock(str(gw.db))
        released = threading.Event()

        def release() -> None:
            lock.release()
            released.set()

        timer = threading.Timer(1.0, release)
        seen = []
        try:
            with gw.client().responses.create(model=MODEL, input="x", stream=True) as stream:
                for event in stream:
                    if event.type == "response.created":
                        response_id = event.response.id
                    elif event.type == "response.output_text.delta" and timer.ident is None:
                        lock.take()  # no one else can write now
                        timer.start()
                    elif event.type == "response.output_item.done":
                        seen.append((released.is_set(), lock.step_state(response_id)))
        finally:
            if timer.ident is not None:  # started
                timer.join()
            lock.close()
    assert seen == [(True, "completed")]
