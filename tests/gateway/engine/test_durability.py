"""The durable event log, fenced take-over, cancel from any replica, idempotency keys — with
real ``stepchain serve`` processes sharing one database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from store import open_store
from tests.gateway.harness import serve_process

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

MODEL = "scripted-model"
TEXT = "The quick brown fox jumps over the lazy dog. "
DONE = b"data: [DONE]\n\n"
SEALING_KEY = "mgIu3c1E_lBwzHjKc9Xl4y2yqsk1VnGm5ZKLL0x9Yyo="


@contextmanager
def gateway(db: str, upstream: str, log: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    # Replicas share their sealing key (without it a PostgreSQL gateway keeps one in its cwd).
    env.setdefault("STEPCHAIN_ENCRYPTED_CONTENT_KEY", SEALING_KEY)
    with serve_process(["--db", db, "--upstream-base-url", upstream], log, env=env) as running:
        yield running


def _split(raw: bytes) -> list[bytes]:
    """SSE bytes as one ``event: …\\ndata: …\\n\\n`` frame each (comments dropped)."""
    frames = [f + b"\n\n" for f in raw.split(b"\n\n") if f]
    return [f for f in frames if not f.startswith(b":")]


def _reattach(url: str, response_id: str, starting_after: int) -> list[bytes]:
    with httpx.stream(
        "GET", f"{url}/v1/responses/{response_id}",
        params={"stream": "true", "starting_after": str(starting_after)}, timeout=60,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        frames = _split(reply.read())
    assert frames[-1] == DONE, frames[-3:]
    return frames[:-1]


def _status(db: str, response_id: str) -> dict:
    async def read() -> dict:
        store = open_store(db)
        await store.open()
        try:
            record = await store.get_response(response_id)
            steps = await store.list_steps(response_id)
            events = await store.list_events(response_id)
        finally:
            await store.close()
        assert record is not None
        return {"record": record, "steps": steps, "events": events}

    return asyncio.run(read())


def test_reattach_on_another_process_is_exact(db_url, tmp_path):
    """A client reads a stream with the openai SDK from process A; process B (same database)
    re-attaches with starting_after mid-stream (following live events of A) and after
    completion: byte-identical events, then [DONE]."""
    model = ScriptedModel()
    model.replies.append(Reply(content=TEXT * 6, chunk_size=6, chunk_delay_s=0.03))
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        url_a, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "a.log"))
        url_b, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "b.log"))
        client = stack.enter_context(
            openai.OpenAI(base_url=f"{url_a}/v1", api_key="test", max_retries=0)
        )
        seen: list[bytes] = []
        follower: dict = {}
        with client.responses.with_streaming_response.create(
            model=MODEL, input="go", stream=True
        ) as stream:
            buffer = b""
            for chunk in stream.iter_bytes():
                buffer += chunk
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    if frame.startswith(b"data: [DONE]"):
                        continue
                    seen.append(frame + b"\n\n")
                if len(seen) >= 8 and "thread" not in follower:
                    response_id = _response_id(seen[0])
                    follower["in_progress_at_start"] = (
                        httpx.get(f"{url_b}/v1/responses/{response_id}").json()["status"]
                    )

                    def follow(after: int = len(seen) - 1) -> None:
                        follower["after"] = after
                        follower["events"] = _reattach(url_b, response_id, after)

                    follower["thread"] = threading.Thread(target=follow)
                    follower["thread"].start()
        follower["thread"].join(60)
        response_id = _response_id(seen[0])
        assert _is_terminal(seen[-1]) and len(seen) > 20
        # Live follower on B, attached while A was still streaming.
        assert follower["in_progress_at_start"] == "in_progress"
        assert follower["events"] == seen[follower["after"] + 1 :]
        # After completion, at several points, on both processes.
        for after in (-1, 0, 5, len(seen) // 2, len(seen) - 2, len(seen) - 1):
            assert _reattach(url_b, response_id, after) == seen[after + 1 :], after
        assert _reattach(url_a, response_id, 3) == seen[4:]
    # And from the store itself: the log is the stream.
    stored = _status(db_url, response_id)["events"]
    assert [event for _seq, event in stored] == seen
    assert [seq for seq, _event in stored] == list(range(len(seen)))


def _response_id(created: bytes) -> str:
    import orjson

    return orjson.loads(created.split(b"data: ", 1)[1])["response"]["id"]


def _is_terminal(frame: bytes) -> bool:
    return frame.startswith((b"event: response.completed", b"event: response.failed",
                             b"event: response.incomplete"))


def test_sigkill_then_restart_resumes_within_two_seconds_and_continues_the_log(db_url, tmp_path):
    """A single gateway (SQLite file, then PostgreSQL) killed mid-stream and restarted: its
    response is claimed at start-up (the dead owner's liveness lock is free), not after the 30 s
    lease, and its event log goes on with the next sequence numbers."""
    model = ScriptedModel()
    model.replies.append(Reply(content="x" * 400, chunk_size=5, chunk_delay_s=0.05))
    model.replies.append(Reply(content="complete answer after the restart"))
    db = db_url
    seen: list[bytes] = []
    with serve_app(create_scripted_upstream(model)) as upstream:
        with gateway(db, f"{upstream}/v1", tmp_path / "a.log", STEPCHAIN_LEASE_S="30") as (url, proc):
            with httpx.stream("POST", f"{url}/v1/responses", timeout=30,
                              json={"model": MODEL, "input": "hi", "stream": True}) as reply:
                buffer = b""
                for chunk in reply.iter_bytes():
                    buffer += chunk
                    *frames, buffer = buffer.split(b"\n\n")
                    seen.extend(f + b"\n\n" for f in frames)
                    if sum(f.startswith(b"event: response.output_text.delta") for f in seen) >= 10:
                        proc.send_signal(signal.SIGKILL)
                        break
            proc.wait(timeout=10)
        response_id = _response_id(seen[0])
        before = _status(db, response_id)
        assert before["record"].status == "in_progress"
        up_since = time.time()
        with gateway(db, f"{upstream}/v1", tmp_path / "b.log", STEPCHAIN_LEASE_S="30") as (url, _):
            up_at = time.time()
            events = _reattach(url, response_id, -1)
    after = _status(db, response_id)
    record = after["record"]
    assert record.status == "completed"
    assert record.owner_epoch == 2 and record.owner != before["record"].owner
    # Resumed within 2 s of the new process being up (store timestamps: its completion, after
    # the re-run model call, against the moment the process answered /healthz).
    assert record.completed_at is not None and record.completed_at - up_at <= 2.0
    assert record.completed_at >= up_since
    assert [s.state for s in after["steps"]] == ["completed"]
    # The log: what the first client saw is a prefix of it, numbered without gaps.
    stored = [event for _seq, event in after["events"]]
    assert [seq for seq, _ in after["events"]] == list(range(len(stored)))
    persisted_before = [event for _seq, event in before["events"]]
    assert stored[: len(persisted_before)] == persisted_before
    assert events == stored and _is_terminal(stored[-1])
    assert b"complete answer after the restart" in stored[-1]
    # The interrupted model call's partial message keeps its place (incomplete); the re-run's
    # message is a new item with its own id.
    ids = [item["id"] for item in record.output]
    assert len(ids) == len(set(ids)) == 2
    assert [item["status"] for item in record.output] == ["incomplete", "completed"]
    assert record.output[1]["content"][0]["text"] == "complete answer after the restart"


class RecordingTool:
    """A tool server that records each call's headers; the first call hangs (until killed)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.called = threading.Event()

        async def tool(request: Request) -> JSONResponse:
            self.calls.append(dict(request.headers))
            self.called.set()
            if len(self.calls) == 1:
                for _ in range(600):  # hang until the gateway that called is killed
                    if await request.is_disconnected():
                        break
                    await asyncio.sleep(0.05)
            return JSONResponse({"answer": 42})

        self.app = Starlette(routes=[Route("/tool", tool, methods=["POST"])])


def _tool_script(body: dict) -> Reply:
    if any(m["role"] == "tool" for m in body["messages"]):
        return Reply(content="done")
    return Reply(tool_calls=[{"id": "call_abc", "name": "charge", "arguments": "{}"}])


def test_idempotency_key_is_stable_across_a_take_over(db_url, tmp_path):
    model = ScriptedModel(default=_tool_script)
    tool = RecordingTool()
    db = db_url
    with serve_app(create_scripted_upstream(model)) as upstream, serve_app(tool.app) as tool_url:
        with gateway(db, f"{upstream}/v1", tmp_path / "a.log") as (url, proc):
            created = httpx.post(f"{url}/v1/tools", json={
                "name": "charge", "description": "d", "url": f"{tool_url}/tool", "idempotent": True,
            })
            assert created.status_code == 201, created.text
            posted = httpx.post(f"{url}/v1/responses", timeout=30,
                                json={"model": MODEL, "input": "go", "background": True})
            response_id = posted.json()["id"]
            assert tool.called.wait(30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        with gateway(db, f"{upstream}/v1", tmp_path / "b.log") as (url, _):
            events = _reattach(url, response_id, -1)
    assert _is_terminal(events[-1]) and events[-1].startswith(b"event: response.completed")
    assert len(tool.calls) == 2
    keys = [c.get("idempotency-key") for c in tool.calls]
    steps = _status(db, response_id)["steps"]
    tool_step = next(s for s in steps if s.kind == "tool_call")
    assert keys == [tool_step.id, tool_step.id]
    assert [c.get("x-stepchain-call-id") for c in tool.calls] == ["call_abc", "call_abc"]


def test_cancel_through_another_process(db_url, tmp_path):
    """POST …/cancel on process B of a background response that process A runs."""
    model = ScriptedModel()
    model.replies.append(Reply(content=TEXT * 40, chunk_size=3, chunk_delay_s=0.05))
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        url_a, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "a.log"))
        url_b, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "b.log"))
        started = httpx.post(f"{url_a}/v1/responses", timeout=30,
                             json={"model": MODEL, "input": "x", "background": True}).json()
        deadline = time.monotonic() + 20
        while not model.requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        client = stack.enter_context(
            openai.OpenAI(base_url=f"{url_b}/v1", api_key="test", max_retries=0)
        )
        cancelled = client.responses.cancel(started["id"])
        assert cancelled.status == "cancelled"
        events = _reattach(url_b, started["id"], -1)
    assert events[-1].startswith(b"event: response.failed")  # a cancelled stream's end
    state = _status(db_url, started["id"])
    assert state["record"].status == "cancelled"
    assert [s.state for s in state["steps"]] == ["canceled"]


def test_fenced_loop_stops_and_writes_nothing_more(db_url, tmp_path):
    """Process A's lease runs out while it is paused (lease_s short, its renewal starved by a
    long claim period is simulated by taking the response over directly): once another owner
    has claimed the response, A's next write is refused and A runs no further step."""
    model = ScriptedModel(default=_tool_script)
    model.replies.append(Reply(content="", tool_calls=[
        {"id": "call_abc", "name": "charge", "arguments": "{}"}], delay_s=1.5))
    tool_calls: list[str] = []

    async def tool(request: Request) -> JSONResponse:
        tool_calls.append(request.headers.get("idempotency-key", ""))
        return JSONResponse({"answer": 1})

    db = db_url
    tool_app = Starlette(routes=[Route("/tool", tool, methods=["POST"])])
    with serve_app(create_scripted_upstream(model)) as upstream, serve_app(tool_app) as tool_url:
        with gateway(db, f"{upstream}/v1", tmp_path / "a.log") as (url, proc):
            httpx.post(f"{url}/v1/tools", json={
                "name": "charge", "description": "d", "url": f"{tool_url}/tool",
            }).raise_for_status()
            posted = httpx.post(f"{url}/v1/responses", timeout=30,
                                json={"model": MODEL, "input": "go", "background": True})
            response_id = posted.json()["id"]
            deadline = time.monotonic() + 20
            while not model.requests:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # Another owner takes the response over while A waits for the model.
            take_over = (
                "UPDATE responses SET owner = 'thief', owner_epoch = owner_epoch + 1,"
                " lease_expires_at = ? WHERE id = ?"
            )
            if db.startswith("postgresql://"):
                with psycopg.connect(db) as pg:
                    pg.execute(take_over.replace("?", "%s"), (time.time() + 600, response_id))
            else:
                with sqlite3.connect(db) as conn:
                    conn.execute(take_over, (time.time() + 600, response_id))
            before = _status(db, response_id)
            deadline = time.monotonic() + 20
            while "taken over" not in (tmp_path / "a.log").read_text():
                assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()
                time.sleep(0.05)
            after = _status(db, response_id)
    assert tool_calls == []  # the model asked for a tool: A did not run it
    assert after["record"].status == "in_progress" and after["record"].owner == "thief"
    assert [(s.id, s.state) for s in after["steps"]] == [(s.id, s.state) for s in before["steps"]]
    assert after["events"] == before["events"]


def test_unreachable_database_at_start_up(tmp_path):
    """One line on stderr naming the database (without its password), exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--upstream-base-url", "http://127.0.0.1:9/v1",
         "--db", "postgresql://stepchain:hunter2secret@127.0.0.1:1/nowhere"],
        capture_output=True, timeout=60, start_new_session=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "127.0.0.1:1" in lines[0] and "nowhere" in lines[0]
    assert "hunter2secret" not in lines[0]


def test_sigterm_finishes_responses_without_a_connection(db_url, tmp_path):
    """A background response (no client connected) still finishes within the grace period."""
    model = ScriptedModel()
    model.replies.append(Reply(content="finished during shutdown", delay_s=1.5))
    db = db_url
    with serve_app(create_scripted_upstream(model)) as upstream:
        with gateway(db, f"{upstream}/v1", tmp_path / "a.log") as (url, proc):
            started = httpx.post(f"{url}/v1/responses", timeout=30,
                                 json={"model": MODEL, "input": "x", "background": True}).json()
            deadline = time.monotonic() + 20
            while not model.requests:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    record = _status(db, started["id"])["record"]
    assert record.status == "completed"
    assert record.output[0]["content"][0]["text"] == "finished during shutdown"


def test_database_outage_503_then_in_flight_responses_go_on(pg_server, pg_dsn, tmp_path):
    """PostgreSQL stopped under a running gateway: new requests get an OpenAI-shaped 503; the
    response in flight pauses at its next write and completes once the database is back."""
    if not pg_server.managed:
        pytest.skip("needs a throwaway PostgreSQL server it may stop")
    model = ScriptedModel()
    # The first chunk comes late: the stop below happens while nothing is being written (the
    # throwaway server runs with synchronous_commit = off, so an immediate stop would lose the
    # last commits, which no production server does).
    model.replies.append(Reply(content=TEXT * 3, chunk_size=4, chunk_delay_s=0.05, delay_s=2.0))
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        url, _ = stack.enter_context(gateway(pg_dsn, f"{upstream}/v1", tmp_path / "a.log"))
        started = httpx.post(f"{url}/v1/responses", timeout=30,
                             json={"model": MODEL, "input": "x", "background": True}).json()
        deadline = time.monotonic() + 20
        while not model.requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # the WAL writer flushes the commits so far (wal_writer_delay 200 ms)
        pg_server.stop()
        try:
            refused = httpx.post(f"{url}/v1/responses", timeout=60,
                                 json={"model": MODEL, "input": "y"})
            fetched = httpx.get(f"{url}/v1/responses/{started['id']}", timeout=60)
        finally:
            pg_server.start()
        for reply in (refused, fetched):
            assert reply.status_code == 503, reply.text
            error = reply.json()["error"]
            assert error["type"] and error["message"] and "Traceback" not in reply.text
        events = _reattach(url, started["id"], -1)
    assert events[-1].startswith(b"event: response.completed")
    state = _status(pg_dsn, started["id"])
    assert state["record"].status == "completed"
    assert [s.state for s in state["steps"]] == ["completed"]
    assert [event for _seq, event in state["events"]] == events


def test_cancel_a_resumed_response(db_url, tmp_path):
    """A background response resumed after its process was killed can be cancelled."""
    model = ScriptedModel()
    model.replies.append(Reply(content=TEXT * 40, chunk_size=3, chunk_delay_s=0.05))
    model.replies.append(Reply(content=TEXT * 40, chunk_size=3, chunk_delay_s=0.05))
    db = db_url
    with serve_app(create_scripted_upstream(model)) as upstream:
        with gateway(db, f"{upstream}/v1", tmp_path / "a.log") as (url, proc):
            started = httpx.post(f"{url}/v1/responses", timeout=30,
                                 json={"model": MODEL, "input": "x", "background": True}).json()
            deadline = time.monotonic() + 20
            while not model.requests:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        with gateway(db, f"{upstream}/v1", tmp_path / "b.log") as (url, _):
            deadline = time.monotonic() + 20
            while len(model.requests) < 2:  # resumed: its model call runs again
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0) as client:
                assert client.responses.cancel(started["id"]).status == "cancelled"
            events = _reattach(url, started["id"], -1)
    assert events[-1].startswith(b"event: response.failed")
    state = _status(db, started["id"])
    assert state["record"].status == "cancelled" and state["record"].owner_epoch == 2
    assert [s.state for s in state["steps"]] == ["canceled"]
    assert [seq for seq, _ in state["events"]] == list(range(len(events)))
