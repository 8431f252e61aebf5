"""Streams survive disconnects: re-attach with starting_after, replay stored responses,
background responses followed and cancelled — through the real openai SDK."""

from __future__ import annotations

import pytest

import time

import httpx

from gateway.testing.scripted_upstream import Reply
from tests.conftest import sqlite_only
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


def test_a_done_event_never_describes_a_step_the_store_lacks(tmp_path):
    """The last model call is stored with the response's result in one write, and its ``*.done``
    events wait for that write. The test holds the database's write lock from its own connection
    for a second from the first delta on: the stream must not show ``response.output_item.done``
    until the lock is gone and the step is ``completed`` in the database."""
    import sqlite3
    import threading

    sqlite_only()
    with running_gateway(tmp_path) as gw:
        gw.model.replies.append(Reply(content="one two three four", chunk_size=4, chunk_delay_s=0.02))
        locker = sqlite3.connect(gw.db, check_same_thread=False, isolation_level=None)
        released = threading.Event()

        def release() -> None:
            locker.execute("ROLLBACK")
            released.set()

        timer = threading.Timer(1.0, release)
        seen = []
        try:
            with gw.client().responses.create(model=MODEL, input="x", stream=True) as stream:
                for event in stream:
                    if event.type == "response.created":
                        response_id = event.response.id
                    elif event.type == "response.output_text.delta" and timer.ident is None:
                        locker.execute("BEGIN IMMEDIATE")  # no one else can write now
                        timer.start()
                    elif event.type == "response.output_item.done":
                        with sqlite3.connect(gw.db) as conn:
                            (state,) = conn.execute(
                                "SELECT state FROM steps WHERE response_id = ?", (response_id,)
                            ).fetchone()
                        seen.append((released.is_set(), state))
        finally:
            if timer.ident is not None:  # started
                timer.join()
            locker.close()
    assert seen == [(True, "completed")]
