"""A write retried after its COMMIT's answer was lost is applied once (issue 11: "no step is
lost or written twice").

Real PostgreSQL behind :class:`tests.chaos.commit_cut.CommitCutProxy`, a loopback TCP proxy
that forwards the write, lets the server commit it, swallows the answer and drops the
connection: the store raises StoreUnavailableError, the response's writer
(:class:`gateway.engine.writer.ResponseWriter`) retries on a new connection, and the retry must
find the first attempt instead of writing again. Before the fix a retried ``record_steps``
stored its steps twice and a retried event-carrying write failed with a conflict.

SQLite cannot lose a COMMIT's answer: the store commits in its own process and the call
returns the outcome or raises with the transaction rolled back; it never reports
StoreUnavailableError, so the writer never retries there (the store-level id checks are tested
on both backends below all the same).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from gateway.engine.writer import ResponseWriter
from store import open_store
from store.types import (
    MODEL_CALL,
    TOOL_CALL,
    Fence,
    ResponseRecord,
    StepDescriptor,
    StoreConflictError,
    new_id,
)
from tests.chaos.commit_cut import CommitCutProxy

OWNER = "owner-a"


def _via(dsn: str, port: int) -> str:
    """``dsn`` pointed at 127.0.0.1:``port`` (the proxy), without SSL negotiation."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    query = "sslmode=disable&gssencmode=disable" + (f"&{parts.query}" if parts.query else "")
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host,
                                     query=query))  # fmt: skip


def _target(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _tools(marker: str, n: int = 4) -> list[StepDescriptor]:
    return [
        StepDescriptor(TOOL_CALL, {"name": "t", "call_id": f"call_{i}", "arguments": marker})
        for i in range(n)
    ]


def _frame(sequence: int, text: str) -> bytes:
    return (f'event: response.output_text.delta\ndata: {{"type":"response.output_text.delta",'
            f'"sequence_number":{sequence},"delta":"{text}"}}\n\n').encode()  # fmt: skip


async def _cut_run(pg_dsn: str, scenario: Callable[[Any, ResponseWriter, Any, CommitCutProxy], Any]) -> None:
    async with CommitCutProxy(*_target(pg_dsn)) as proxy:
        store = open_store(_via(pg_dsn, proxy.port))
        await store.open()
        try:
            record = ResponseRecord(id=new_id("resp"), model="m", request={"model": "m"},
                                    created_at=time.time())  # fmt: skip
            (first,) = await store.create_response(
                record, owner=OWNER, lease_s=60,
                first_steps=[StepDescriptor(MODEL_CALL, {"model": "m"})],
                events=(0, [_frame(0, "created")]),
            )  # fmt: skip
            writer = ResponseWriter(store, record.id, Fence(OWNER, 1), retry_max_s=0.2)
            try:
                await asyncio.wait_for(scenario(store, writer, first, proxy), 120)
            finally:
                await writer.close()
            assert proxy.cuts == 1, "the proxy cut no write: the test did not test anything"
        finally:
            await store.close()


def test_record_steps_retried_after_a_lost_commit_writes_its_steps_once(pg_dsn):
    async def scenario(store, writer, first, proxy):
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        steps = await writer.record_steps(first.response_id, None, first.id, _tools(marker), start=True)
        chain = await store.list_chain(first.response_id)
        assert [s.id for s in chain] == [first.id, *(s.id for s in steps)]
        assert [s.sequence for s in chain] == [1, 2, 3, 4, 5]
        assert all(s.state == "processing" for s in chain)
        # The chain goes on without a gap after the retried write.
        (model,) = await writer.record_steps(
            first.response_id, None, steps[-1].id, [StepDescriptor(MODEL_CALL, {"model": "m"})]
        )
        assert model.sequence == 6

    asyncio.run(_cut_run(pg_dsn, scenario))


def test_a_retried_write_carrying_events_stores_them_once(pg_dsn):
    async def scenario(store, writer, first, proxy):
        rid = first.response_id
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        steps = await writer.record_steps(rid, None, first.id, _tools(marker, 2), start=True,
                                          events=(1, [_frame(1, marker)]))  # fmt: skip
        assert len(await store.list_chain(rid)) == 3
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        await writer.update_response(rid, events=(2, [_frame(2, marker), _frame(3, "more")]))
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        done = await writer.complete_step(steps[0].id, {"out": marker}, events=(4, [_frame(4, "d")]))
        assert done.state == "completed" and done.response_payload == {"out": marker}
        events = await store.list_events(rid)
        assert [seq for seq, _ in events] == [0, 1, 2, 3, 4]
        assert proxy.cuts == 3
        proxy.cuts = 1  # (the harness asserts one cut per run)

    asyncio.run(_cut_run(pg_dsn, scenario))


def test_the_final_write_retried_after_a_lost_commit_completes_the_response(pg_dsn):
    """The last model call, the response's result, its conversation turn and the terminal
    event in one write (the service's final write): the retry returns the stored step."""

    async def scenario(store, writer, first, proxy):
        rid = first.response_id
        from store.types import ConversationRecord

        conversation = ConversationRecord(id=new_id("conv"), created_at=time.time())
        await store.create_conversation(conversation)
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        result = {"status": "completed", "output": [{"type": "message", "text": marker}],
                  "completed_at": time.time()}  # fmt: skip
        step = await writer.complete_step(
            first.id, {"choices": []}, {"prompt_tokens": 1}, response_update=result,
            events=(1, [_frame(1, "terminal")]),
            conversation_items=(conversation.id, [{"id": new_id("msg"), "type": "message"}]),
        )  # fmt: skip
        assert step.state == "completed"
        record = await store.get_response(rid)
        assert record is not None and record.status == "completed"
        items, _ = await store.list_conversation_items(conversation.id)
        assert len(items) == 1
        assert [seq for seq, _ in await store.list_events(rid)] == [0, 1]

    asyncio.run(_cut_run(pg_dsn, scenario))


def test_an_attempt_and_a_transition_retried_after_a_lost_commit_count_once(pg_dsn):
    async def scenario(store, writer, first, proxy):
        rid = first.response_id
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        await writer.record_attempt(first.id, {"type": "server_error", "message": marker}, "up")
        step = await store.get_step(first.id)
        assert step is not None and len(step.attempts) == 1
        assert step.attempts[0]["message"] == marker
        (pending,) = await writer.record_steps(rid, None, first.id, _tools("p", 1))
        marker = new_id("marker")
        proxy.cut_after(marker.encode())
        started = await writer.mark_processing(pending.id, events=(1, [_frame(1, marker)]))
        assert started.state == "processing" and started.attempt == 1
        proxy.cuts = 1

    asyncio.run(_cut_run(pg_dsn, scenario))


def test_step_ids_given_by_the_caller_conflict_instead_of_writing_twice(db_url):
    """Both backends: ``record_steps(ids=…)`` with ids already stored writes nothing."""

    async def main() -> None:
        store = open_store(db_url)
        await store.open()
        try:
            record = ResponseRecord(id=new_id("resp"), model="m", request={"model": "m"},
                                    created_at=time.time())  # fmt: skip
            (first,) = await store.create_response(record, first_steps=[StepDescriptor(MODEL_CALL, {})])
            ids = [new_id("step") for _ in range(3)]
            steps = await store.record_steps(record.id, None, first.id, _tools("x", 3), ids=ids)
            assert [s.id for s in steps] == ids
            with pytest.raises(StoreConflictError):
                await store.record_steps(record.id, None, first.id, _tools("x", 3), ids=ids,
                                         events=(0, [b"e"]))  # fmt: skip
            assert [s.id for s in await store.list_chain(record.id)] == [first.id, *ids]
            assert await store.list_events(record.id) == []
            with pytest.raises(ValueError):
                await store.record_steps(record.id, None, None, _tools("x", 2), ids=["a", "a"])
            # An attempt's error with an id is appended once.
            error = {"type": "server_error", "message": "m", "id": "att_1"}
            await store.record_attempt(first.id, error)
            await store.record_attempt(first.id, error)
            await store.record_attempt(first.id, {"type": "server_error", "message": "m"})
            await store.record_attempt(first.id, {"type": "server_error", "message": "m"})
            step = await store.get_step(first.id)
            assert step is not None and len(step.attempts) == 3
        finally:
            await store.close()

    asyncio.run(main())


def test_a_gateway_that_loses_a_commit_answer_writes_each_step_once(pg_dsn, tmp_path):
    """End to end: a real ``stepchain serve`` on PostgreSQL through the proxy; the write of the
    model's tool call step loses its answer after committing. The response completes, the tool
    runs once, and the chain holds each step once, none left ``processing``."""
    import threading

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
    from gateway.testing.serving import serve_app
    from tests.chaos.commit_cut import proxy_in_thread
    from tests.gateway.engine.test_durability import _status, gateway

    call_id = new_id("call")
    calls: list[dict] = []
    lock = threading.Lock()

    def script(body: dict) -> Reply:
        if any(m["role"] == "tool" for m in body["messages"]):
            return Reply(content="done")
        return Reply(tool_calls=[{"id": call_id, "name": "charge", "arguments": '{"q": 1}'}])

    async def tool(request: Request) -> JSONResponse:
        with lock:
            calls.append(await request.json())
        return JSONResponse({"charged": True})

    tools = Starlette(routes=[Route("/tool", tool, methods=["POST"])])
    with proxy_in_thread(*_target(pg_dsn)) as proxy, \
            serve_app(create_scripted_upstream(ScriptedModel(default=script))) as upstream, \
            serve_app(tools) as tool_url, \
            gateway(_via(pg_dsn, proxy.port), f"{upstream}/v1", tmp_path / "gw.log") as (url, _):  # fmt: skip
        created = httpx.post(f"{url}/v1/tools", json={
            "name": "charge", "description": "d", "url": f"{tool_url}/tool", "idempotent": False,
        })  # fmt: skip
        assert created.status_code == 201, created.text
        # The statement that inserts the tool call's step (its call_id is in its payload).
        proxy.cut_after(call_id.encode(), b"INSERT INTO steps")
        reply = httpx.post(f"{url}/v1/responses", timeout=120,
                           json={"model": "scripted-model", "input": "go"})  # fmt: skip
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert proxy.cuts == 1
    assert body["status"] == "completed", body
    assert len(calls) == 1
    steps = _status(pg_dsn, body["id"])["steps"]
    assert [(s.kind, s.state) for s in steps] == [
        ("model_call", "completed"), ("tool_call", "completed"), ("model_call", "completed"),
    ]
    assert [s.sequence for s in steps] == [1, 2, 3]


def test_a_creation_that_commits_unacknowledged_is_not_left_behind(pg_dsn, tmp_path):
    """The write that creates a response commits, its answer is lost: the client gets a 503
    (creations are not retried), and the stored response — leased to a live process that will
    never run it — is deleted once the store answers again, instead of staying in_progress."""
    import httpx
    import psycopg

    from gateway.testing.scripted_upstream import ScriptedModel, create_scripted_upstream
    from gateway.testing.serving import serve_app
    from tests.chaos.commit_cut import proxy_in_thread
    from tests.gateway.engine.test_durability import gateway

    marker = new_id("marker")

    def stored() -> int:
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT count(*) FROM responses WHERE request::text LIKE %s",
                               (f"%{marker}%",)).fetchone()  # fmt: skip
        return row[0] if row else 0

    with proxy_in_thread(*_target(pg_dsn)) as proxy, \
            serve_app(create_scripted_upstream(ScriptedModel())) as upstream, \
            gateway(_via(pg_dsn, proxy.port), f"{upstream}/v1", tmp_path / "gw.log") as (url, _):  # fmt: skip
        proxy.cut_after(marker.encode(), b"INSERT INTO responses")
        reply = httpx.post(f"{url}/v1/responses", timeout=120,
                           json={"model": "scripted-model", "input": marker})  # fmt: skip
        assert proxy.cuts == 1
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["type"]
        deadline = time.monotonic() + 60  # the deletion follows at once; a bound, not a speed
        while stored() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stored() == 0
        # And the gateway serves the client's retry normally.
        again = httpx.post(f"{url}/v1/responses", timeout=120,
                           json={"model": "scripted-model", "input": "again"})  # fmt: skip
        assert again.status_code == 200 and again.json()["status"] == "completed"
