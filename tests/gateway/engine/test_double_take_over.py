"""A response taken over twice (issue 11, "Crash take-over is immediate and fenced"): owner A
is SIGKILLed mid model call, B takes over and is SIGKILLed mid the next model call (or mid the
re-run of the same one), C takes over and finishes. Real ``stepchain serve`` processes on one
database (SQLite file and PostgreSQL), a scripted streaming upstream and a real HTTP tool.

The final response and the event stream must be what the design defines for a take-over, as
after a single one: every item that was ever added keeps its ``output_index`` — an interrupted
model call's items end ``incomplete``, its re-run's items are new ones (ids suffixed ``_1``,
``_2``) — and the terminal event's ``output``, the stored response's ``output`` and the items
of the ``output_item.done`` events (one per ``output_item.added``) are the same list.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.gateway.engine.test_durability import _reattach, _status, gateway

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

MODEL = "scripted-model"
FIRST = "First part of the answer. " * 12
SECOND = "Second answer, after the tool. " * 12


def _events(frames: Iterator[bytes]) -> Iterator[dict]:
    for frame in frames:
        if frame.startswith(b"data: [DONE]") or not frame.strip() or frame.startswith(b":"):
            continue
        yield orjson.loads(frame.split(b"data: ", 1)[1])


def _frames(reply: httpx.Response) -> Iterator[bytes]:
    buffer = b""
    for chunk in reply.iter_bytes():
        buffer += chunk
        *frames, buffer = buffer.split(b"\n\n")
        yield from frames


def _read_until(reply: httpx.Response, seen: list[dict], prefix: str, proc: subprocess.Popen) -> None:
    """Read events into ``seen`` until an item's streamed text starts with ``prefix`` and has
    40 characters or more; then SIGKILL ``proc`` (the replica streaming it)."""
    texts: dict[str, str] = {}
    for event in _events(_frames(reply)):
        seen.append(event)
        if event["type"] == "response.output_text.delta":
            text = texts[event["item_id"]] = texts.get(event["item_id"], "") + event["delta"]
            if text.startswith(prefix[:20]) and len(text) >= 40:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return
    raise AssertionError(f"the stream ended before {prefix[:20]!r} streamed: {seen[-3:]}")


# Chunk 0 carries the role; chunks 1.. carry 5 characters each: a held call has streamed 95.
_HOLD_AFTER = 20


def _script(held_first: int, held_second: int):
    """The first model call streams FIRST and asks for the tool; the second streams SECOND.

    The first ``held_first`` runs of the first call (and ``held_second`` of the second) stream
    95 characters and then hold the stream open until their client (the gateway) disconnects:
    such a call cannot finish before the test has killed its gateway, whatever the load.
    """
    runs = {"first": 0, "second": 0}

    def script(body: dict) -> Reply:
        call = "second" if any(m["role"] == "tool" for m in body["messages"]) else "first"
        runs[call] += 1
        held = runs[call] <= (held_first if call == "first" else held_second)
        stall = _HOLD_AFTER if held else None
        if call == "first":
            return Reply(content=FIRST, chunk_size=5, chunk_delay_s=0.01, stall_after_chunks=stall,
                         tool_calls=[{"id": "call_1", "name": "lookup", "arguments": '{"q": 1}'}])  # fmt: skip
        return Reply(content=SECOND, chunk_size=5, chunk_delay_s=0.01, stall_after_chunks=stall)

    return script


def _tool_app() -> Starlette:
    async def tool(request: Request) -> JSONResponse:
        return JSONResponse({"answer": 42})

    return Starlette(routes=[Route("/tool", tool, methods=["POST"])])


@pytest.mark.parametrize("second_kill", ["next_call", "same_call"])
def test_a_response_taken_over_twice_keeps_every_item_of_both_interrupted_calls(
    db_url: str, tmp_path: Path, second_kill: str
) -> None:
    """next_call: A dies mid the first model call, B re-runs it (it completes with a tool call),
    runs the tool and dies mid the second model call; C re-runs the second one.
    same_call: B dies mid its re-run of the first model call; C re-runs it again."""
    # A's first call, and B's call (the next one or the re-run), hold until their gateway dies.
    held = (1, 1) if second_kill == "next_call" else (2, 0)
    model = ScriptedModel(default=_script(*held))
    # B is killed once the text of this model call streams (a re-run streams the same text).
    b_dies_in = SECOND if second_kill == "next_call" else FIRST
    seen: list[dict] = []
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        tools = stack.enter_context(serve_app(_tool_app()))
        env = {"STEPCHAIN_LEASE_S": "30"}
        url_a, proc_a = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "a.log", **env))
        created = httpx.post(f"{url_a}/v1/tools", json={
            "name": "lookup", "description": "d", "url": f"{tools}/tool", "idempotent": True,
        })  # fmt: skip
        assert created.status_code == 201, created.text
        with httpx.stream("POST", f"{url_a}/v1/responses", timeout=60,
                          json={"model": MODEL, "input": "go", "stream": True}) as reply:  # fmt: skip
            _read_until(reply, seen, FIRST, proc_a)
        response_id = seen[0]["response"]["id"]
        url_b, proc_b = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "b.log", **env))
        with httpx.stream("GET", f"{url_b}/v1/responses/{response_id}", timeout=60,
                          params={"stream": "true", "starting_after": str(seen[-1]["sequence_number"])},
                          ) as reply:  # fmt: skip
            assert reply.status_code == 200
            if b_dies_in == FIRST:
                # Past A's partial text: B's re-run of the first call opens a new item.
                before = len(seen)
                _read_until(reply, seen, FIRST, proc_b)
                assert any(e["type"] == "response.output_item.added" for e in seen[before:])
            else:
                _read_until(reply, seen, SECOND, proc_b)
        url_c, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "c.log", **env))
        after = seen[-1]["sequence_number"]
        rest = list(_events(iter(_reattach(url_c, response_id, after))))
        full = list(_events(iter(_reattach(url_c, response_id, -1))))
        got = httpx.get(f"{url_c}/v1/responses/{response_id}").json()

    stored = _status(db_url, response_id)
    # The client's view: what it saw of A and B, then the rest from C = a full replay.
    client = seen + rest
    assert [e["sequence_number"] for e in client] == list(range(len(client)))
    assert client == full
    terminal = full[-1]
    assert terminal["type"] == "response.completed", terminal
    # Every item added once and done once; the done items are the final output, in order.
    added = [e for e in full if e["type"] == "response.output_item.added"]
    done = {e["output_index"]: e["item"] for e in full if e["type"] == "response.output_item.done"}
    assert [e["output_index"] for e in added] == list(range(len(added)))
    assert sum(e["type"] == "response.output_item.done" for e in full) == len(added) == len(done)
    output = terminal["response"]["output"]
    assert output == [done[i] for i in range(len(added))]
    assert got["output"] == output and stored["record"].output == output
    ids = [item["id"] for item in output]
    assert len(set(ids)) == len(ids)
    shape = [(item["type"], item["status"]) for item in output]
    message, call = "message", "mcp_call"
    if second_kill == "next_call":
        # A's partial first call, B's full re-run of it, the tool, B's partial second call,
        # C's re-run of the second call.
        assert shape == [(message, "incomplete"), (message, "completed"), (call, "completed"),
                         (message, "incomplete"), (message, "completed")]  # fmt: skip
        texts = [output[1]["content"][0]["text"], output[4]["content"][0]["text"]]
        assert texts == [FIRST, SECOND]
        assert ids[1] == ids[0] + "_1" and ids[4] == ids[3] + "_1"
    else:
        # A's partial first call, B's partial re-run, C's full re-run, the tool, the answer.
        assert shape == [(message, "incomplete"), (message, "incomplete"), (message, "completed"),
                         (call, "completed"), (message, "completed")]  # fmt: skip
        assert [output[2]["content"][0]["text"], output[4]["content"][0]["text"]] == [FIRST, SECOND]
        assert ids[1] == ids[0] + "_1" and ids[2] == ids[0] + "_2"
    assert stored["record"].owner_epoch == 3
    assert all(step.state == "completed" for step in stored["steps"])
