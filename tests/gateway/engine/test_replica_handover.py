"""Hand-over between live replicas of one database (issue 11), with real ``stepchain serve``
processes on SQLite and PostgreSQL and a scripted upstream:

- A replica paused longer than its lease (SIGSTOP) while it runs a response: another replica
  takes the response over and finishes it; when the paused one wakes (SIGCONT) its next write
  is refused and it runs nothing more — the non-idempotent tool runs once, the chain and the
  event log hold only the new owner's work ("a process paused longer than ``lease_s`` keeps
  writing steps while another resumes the same response"). Nothing is simulated: replica A is
  stopped by the kernel with its upstream request in flight, its lease runs out, replica B's
  recovery sweep claims the response as it would in production.
- A client streaming from the paused replica keeps its connection: once that replica finds it
  lost the response, the client gets the new owner's events from the store, then ``[DONE]``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import ExitStack

import httpx
import orjson
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
from store.types import COMPLETED, MODEL_CALL, TOOL_CALL
from tests.gateway.engine.test_durability import (
    DONE,
    MODEL,
    _reattach,
    _status,
    gateway,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

LEASE_S = 2.0  # replica A's lease: it lapses soon after A is stopped
FIRST = "Replica A had started on this answer when it was stopped. " * 8


def _script(body: dict) -> Reply:
    """``ping`` → ``pong``; a request with the tool's output → ``done``; else call ``charge``."""
    messages = body["messages"]
    if any(m["role"] == "tool" for m in messages):
        return Reply(content="done")
    if messages[-1].get("content") == "ping":
        return Reply(content="pong")
    return Reply(tool_calls=[{"id": "call_abc", "name": "charge", "arguments": "{}"}])


def _wait(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_paused_replica_is_fenced_out_by_the_replica_that_took_over(db_url, tmp_path):
    model = ScriptedModel(default=_script)
    # A's model call: answered after A is stopped (the bytes wait in A's socket meanwhile).
    model.replies.append(Reply(tool_calls=[{"id": "call_abc", "name": "charge", "arguments": "{}"}],
                               delay_s=0.5))  # fmt: skip
    charges: list[dict[str, str]] = []

    async def charge(request: Request) -> JSONResponse:
        charges.append(dict(request.headers))
        return JSONResponse({"charged": True})

    tool_app = Starlette(routes=[Route("/charge", charge, methods=["POST"])])
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        tool_url = stack.enter_context(serve_app(tool_app))
        url_a, proc_a = stack.enter_context(
            gateway(db_url, f"{upstream}/v1", log_a, STEPCHAIN_LEASE_S=str(LEASE_S))
        )
        url_b, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", log_b))
        registered = httpx.post(f"{url_a}/v1/tools", json={
            "name": "charge", "description": "charge the card once", "url": f"{tool_url}/charge",
        })  # fmt: skip
        assert registered.status_code == 201, registered.text
        posted = httpx.post(f"{url_a}/v1/responses", timeout=30,
                            json={"model": MODEL, "input": "buy it", "background": True})  # fmt: skip
        assert posted.status_code == 200, posted.text
        response_id = posted.json()["id"]

        # Stop A while its model call is in flight: it can neither renew its lease nor write.
        _wait(lambda: len(model.requests) >= 1, "A's model call")
        proc_a.send_signal(signal.SIGSTOP)
        try:
            # B claims the response once A's lease has run out, re-runs the model call, runs
            # the tool and finishes the response.
            _wait(lambda: httpx.get(f"{url_b}/v1/responses/{response_id}").json()["status"]
                  == "completed", "B to finish the response")  # fmt: skip
            finished = _status(db_url, response_id)
        finally:
            proc_a.send_signal(signal.SIGCONT)
        # A wakes with the answer to its model call waiting: its write of that step is refused.
        _wait(lambda: "taken over" in log_a.read_text(), "A to find it was taken over")
        time.sleep(0.5)  # time for anything A (wrongly) went on to do
        after = _status(db_url, response_id)
        # A still serves: a new response on A completes.
        pong = httpx.post(f"{url_a}/v1/responses", timeout=30, json={"model": MODEL, "input": "ping"})
        assert pong.status_code == 200 and pong.json()["status"] == "completed", pong.text
        from_a = _reattach(url_a, response_id, -1)
        from_b = _reattach(url_b, response_id, -1)

    record, steps = after["record"], after["steps"]
    # B took over: one take-over (epoch 2), once A's lease (set when A created it) ran out —
    # A's owner lock was still held, so not at once as after a death.
    assert record.status == "completed" and record.owner_epoch == 2
    assert record.completed_at is not None and record.completed_at >= record.created_at + LEASE_S
    # The chain: A's model call (re-run by B), the tool call, the final model call: nothing of
    # A's after the take-over, nothing twice.
    assert [(s.kind, s.state) for s in steps] == [
        (MODEL_CALL, COMPLETED), (TOOL_CALL, COMPLETED), (MODEL_CALL, COMPLETED)
    ]  # fmt: skip
    assert any(a.get("type") == "interrupted" for a in steps[0].attempts)
    assert steps == finished["steps"]  # A, woken, changed no step
    assert after["events"] == finished["events"]  # nor the event log
    # The non-idempotent tool ran once (B's run), with the step's id as its Idempotency-Key.
    assert len(charges) == 1
    assert charges[0].get("idempotency-key") == steps[1].id
    assert charges[0].get("x-stepchain-call-id") == "call_abc"
    # The upstream saw A's call, B's re-run and B's last call (then A's new "ping"): A made no
    # second model call for the response it lost.
    assert len(model.requests) == 4
    assert model.requests[3]["messages"][-1]["content"] == "ping"
    # Its stream, from either replica: the store's log, in order, ending completed.
    assert from_a == from_b == [event for _seq, event in after["events"]]
    assert [seq for seq, _event in after["events"]] == list(range(len(from_a)))
    last = orjson.loads(from_a[-1].split(b"data: ", 1)[1])
    assert last["type"] == "response.completed"
    assert last["response"]["output"][-1]["content"][0]["text"] == "done"


def test_a_client_of_a_paused_replica_gets_the_rest_of_its_stream_from_the_new_owner(
    db_url, tmp_path
):
    """A client streams a response from replica A; A is stopped mid-stream (SIGSTOP) past its
    lease; B takes the response over, re-runs the interrupted model call and finishes it. When
    A wakes, its loop is refused at its next write, and the client still connected to A goes
    on from the store: it receives B's events after the last one A had stored, then ``[DONE]``
    — its whole stream is the durable log, byte for byte, with no sequence number twice."""
    model = ScriptedModel()
    # A's model call streams slowly (the client sees some of it before A is stopped).
    model.replies.append(Reply(content=FIRST, chunk_size=4, chunk_delay_s=0.03))
    model.replies.append(Reply(content="Answered by replica B."))
    frames: list[bytes] = []
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        url_a, proc_a = stack.enter_context(
            gateway(db_url, f"{upstream}/v1", tmp_path / "a.log", STEPCHAIN_LEASE_S=str(LEASE_S))
        )
        url_b, _ = stack.enter_context(gateway(db_url, f"{upstream}/v1", tmp_path / "b.log"))
        stopped = threading.Event()

        def read() -> None:
            body = {"model": MODEL, "input": "go", "stream": True}
            with httpx.stream("POST", f"{url_a}/v1/responses", json=body, timeout=60) as reply:
                assert reply.status_code == 200
                buffer = b""
                for chunk in reply.iter_bytes():
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n\n")
                    frames.extend(f + b"\n\n" for f in complete if f and not f.startswith(b":"))
                    if len(frames) >= 12 and not stopped.is_set():
                        proc_a.send_signal(signal.SIGSTOP)
                        stopped.set()

        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert stopped.wait(30), "the stream did not get far enough"
            response_id = orjson.loads(frames[0].split(b"data: ", 1)[1])["response"]["id"]
            _wait(lambda: httpx.get(f"{url_b}/v1/responses/{response_id}").json()["status"]
                  == "completed", "B to finish the response")  # fmt: skip
        finally:
            proc_a.send_signal(signal.SIGCONT)
        reader.join(60)
        assert not reader.is_alive(), "the client of A never got the end of its stream"
        _wait(lambda: "taken over" in (tmp_path / "a.log").read_text(), "A to find it was taken over")
        from_b = _reattach(url_b, response_id, -1)
        stored = _status(db_url, response_id)

    assert frames[-1] == DONE
    seen = frames[:-1]
    assert seen == [event for _seq, event in stored["events"]] == from_b
    numbers = [orjson.loads(f.split(b"data: ", 1)[1])["sequence_number"] for f in seen]
    assert numbers == list(range(len(seen)))
    last = orjson.loads(seen[-1].split(b"data: ", 1)[1])
    assert last["type"] == "response.completed"
    assert last["response"]["output"][-1]["content"][0]["text"] == "Answered by replica B."
    assert stored["record"].owner_epoch == 2 and len(model.requests) == 2
