"""A gateway process killed with SIGKILL mid-loop, restarted on the same database: every
response ends, no step stays processing; SIGTERM lets in-flight responses finish. On SQLite and
on PostgreSQL (the rows are read with each backend's own driver)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.testing.scripted_upstream import (
    Reply,
    ScriptedModel,
    create_scripted_upstream,
)
from gateway.testing.serving import serve_app
from tests.gateway.harness import fresh_db, serve_process

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.usefixtures("on_both_backends"),
]


@contextmanager
def gateway_process(db: Path | str, upstream: str, log: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    with serve_process(["--db", str(db), "--upstream-base-url", upstream], log,
                       env={"STEPCHAIN_LEASE_S": "1", **env}) as running:
        yield running


class SlowTool:
    def __init__(self) -> None:
        self.calls = 0
        self.called = threading.Event()

        async def slow(request: Request) -> JSONResponse:
            self.calls += 1
            self.called.set()
            import asyncio

            await asyncio.sleep(1.5)
            return JSONResponse({"answer": 42})

        self.app = Starlette(routes=[Route("/slow", slow, methods=["POST"])])


def _script(body):
    tool_messages = [m for m in body["messages"] if m["role"] == "tool"]
    if tool_messages:
        return Reply(content=f"tool said: {tool_messages[-1]['content']}")
    return Reply(tool_calls=[{"id": "call_slow", "name": "slow", "arguments": "{}"}])


def _rows(db: Path | str) -> tuple[list[tuple], list[tuple]]:
    """``(id, status)`` of every response, ``(kind, state, error JSON, sequence)`` of every step."""
    responses_sql = "SELECT id, status FROM responses"
    steps_sql = "SELECT kind, state, CAST(error AS TEXT), sequence FROM steps ORDER BY sequence"
    if str(db).startswith("postgresql://"):
        with psycopg.connect(str(db)) as pg:
            return pg.execute(responses_sql).fetchall(), pg.execute(steps_sql).fetchall()
    with sqlite3.connect(db) as conn:
        responses = conn.execute(responses_sql).fetchall()
        steps = conn.execute(steps_sql).fetchall()
    return responses, steps


def _wait_all_finished(db: Path | str, timeout: float = 30) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        responses, _ = _rows(db)
        if responses and all(status not in ("in_progress", "queued") for _, status in responses):
            return responses
        assert time.monotonic() < deadline, f"still unfinished: {responses}"
        time.sleep(0.1)


def _post_in_background(url: str, body: dict) -> threading.Thread:
    def run():
        try:
            httpx.post(f"{url}/v1/responses", json=body, timeout=30)
        except httpx.TransportError:
            pass  # the gateway is killed under this request

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("idempotent", [pytest.param(False, id="tool-fails-interrupted"),
                                        pytest.param(True, id="idempotent-tool-reruns")])
def test_sigkill_during_a_tool_call_then_restart(tmp_path, idempotent):
    model = ScriptedModel(default=_script)
    tool = SlowTool()
    db = fresh_db(tmp_path)
    log = tmp_path / "gateway.log"
    with serve_app(create_scripted_upstream(model)) as upstream, serve_app(tool.app) as tool_url:
        with gateway_process(db, f"{upstream}/v1", log) as (url, proc):
            created = httpx.post(f"{url}/v1/tools", json={
                "name": "slow", "description": "slow tool", "url": f"{tool_url}/slow",
                "idempotent": idempotent,
            })
            assert created.status_code == 201, created.text
            _post_in_background(url, {"model": "scripted-model", "input": "go"})
            assert tool.called.wait(20)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        _, steps = _rows(db)
        assert ("tool_call", "processing") in [(k, s) for k, s, _, _ in steps]
        with gateway_process(db, f"{upstream}/v1", log):
            responses = _wait_all_finished(db)
    assert [status for _, status in responses] == ["completed"]
    _, steps = _rows(db)
    assert [(kind, state) for kind, state, _, _ in steps] == [
        ("model_call", "completed"),
        ("tool_call", "completed" if idempotent else "failed"),
        ("model_call", "completed"),
    ]
    last_messages = model.requests[-1]["messages"]
    if idempotent:
        assert tool.calls == 2
        assert last_messages[-1]["content"] == '{"answer":42}'
    else:
        assert tool.calls == 1
        assert "interrupted" in steps[1][2]
        assert last_messages[-1]["content"].startswith("Error: ") and "interrupted" in last_messages[-1]["content"]


def test_sigkill_during_a_streamed_model_call_then_restart(tmp_path):
    model = ScriptedModel()
    model.replies.append(Reply(content="x" * 200, chunk_size=5, chunk_delay_s=0.1))
    model.replies.append(Reply(content="complete answer after the restart"))
    db = fresh_db(tmp_path)
    log = tmp_path / "gateway.log"
    with serve_app(create_scripted_upstream(model)) as upstream:
        with gateway_process(db, f"{upstream}/v1", log) as (url, proc):
            with httpx.stream("POST", f"{url}/v1/responses", timeout=30,
                              json={"model": "scripted-model", "input": "hi", "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: response.output_text.delta"):
                        proc.send_signal(signal.SIGKILL)
                        break
            proc.wait(timeout=10)
        with gateway_process(db, f"{upstream}/v1", log) as (url, _):
            (rid, status), = _wait_all_finished(db)
            response = httpx.get(f"{url}/v1/responses/{rid}").json()
    assert status == "completed"
    assert response["output"][-1]["content"][0]["text"] == "complete answer after the restart"
    _, steps = _rows(db)
    assert [(kind, state) for kind, state, _, _ in steps] == [("model_call", "completed")]


def test_sigterm_lets_in_flight_responses_finish(tmp_path):
    model = ScriptedModel()
    model.replies.append(Reply(content="finished during shutdown", delay_s=1.0))
    db = fresh_db(tmp_path)
    log = tmp_path / "gateway.log"
    result: dict = {}
    with serve_app(create_scripted_upstream(model)) as upstream:
        with gateway_process(db, f"{upstream}/v1", log) as (url, proc):
            def run():
                result["response"] = httpx.post(
                    f"{url}/v1/responses", json={"model": "scripted-model", "input": "x"}, timeout=30
                )

            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 10
            while not model.requests:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            thread.join(timeout=30)
            # uvicorn re-raises the signal once its graceful shutdown is done.
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert result["response"].status_code == 200
    assert result["response"].json()["output"][0]["content"][0]["text"] == "finished during shutdown"
    responses, steps = _rows(db)
    assert [s for _, s in responses] == ["completed"]
    assert all(state == "completed" for _, state, _, _ in steps)


def test_sigterm_past_the_grace_period_leaves_the_rest_for_resumption(tmp_path):
    """A response still running when the grace period ends is released, not lost: the next
    process resumes it at once (its lease was given up) and it completes."""
    model = ScriptedModel()
    model.replies.append(Reply(content="too slow for the grace period", delay_s=5.0))
    model.replies.append(Reply(content="finished by the next process"))
    db = fresh_db(tmp_path)
    log = tmp_path / "gateway.log"
    with serve_app(create_scripted_upstream(model)) as upstream:
        with gateway_process(db, f"{upstream}/v1", log, STEPCHAIN_LEASE_S="60",
                             STEPCHAIN_SHUTDOWN_GRACE_S="0.5") as (url, proc):
            _post_in_background(url, {"model": "scripted-model", "input": "x"})
            deadline = time.monotonic() + 10
            while not model.requests:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        responses, _ = _rows(db)
        assert [s for _, s in responses] == ["in_progress"]
        # A 60 s lease would hold a killed process's work for a minute; a released one is free now.
        with gateway_process(db, f"{upstream}/v1", log, STEPCHAIN_LEASE_S="60"):
            responses = _wait_all_finished(db, timeout=20)
    assert [s for _, s in responses] == ["completed"]
    _, steps = _rows(db)
    assert [(kind, state) for kind, state, _, _ in steps] == [("model_call", "completed")]


def test_a_slow_chat_passthrough_keeps_its_lease(tmp_path):
    """Leases cover chat passthrough calls too: a sweep during a slow call must not take it over."""
    from tests.gateway.harness import running_gateway

    with running_gateway(tmp_path, lease_s=0.6) as gw:
        gw.model.replies.append(Reply(content="slow but mine", delay_s=2.0))
        with gw.client() as client:
            completion = client.chat.completions.create(
                model="scripted-model", messages=[{"role": "user", "content": "hi"}]
            )
        assert completion.choices[0].message.content == "slow but mine"
        assert len(gw.model.requests) == 1
    _, steps = _rows(gw.db)
    assert [(kind, state) for kind, state, _, _ in steps] == [("model_call", "completed")]
