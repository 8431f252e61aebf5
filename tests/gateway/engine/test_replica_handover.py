"""Hand-over between live replicas of one database (issue 11), with real ``stepchain serve``
processes on SQLite and PostgreSQL and a scripted upstream:

- A replica paused longer than its lease (SIGSTOP) while it runs a response: another replica
  takes the response over and finishes it; when the paused one wakes (SIGCONT) its next write
  is refused and it runs nothing more — the non-idempotent tool runs once, the chain and the
  event log hold only the new owner's work ("a process paused longer than ``lease_s`` keeps
  writing steps while another resumes the same response"). Nothing is simulated: replica A is
  stopped by the kernel with its upstream request in flight, its lease runs out, replica B's
  recovery sweep claims the response as it would in production.
- A replica stopped with SIGTERM whose response outlasts ``shutdown_grace_s``: the other
  replica takes the response at once, not after the lease ("then releases the rest so another
  replica takes them at once").
"""

from __future__ import annotations

import signal
import sys
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
from tests.gateway.engine.test_durability import MODEL, _reattach, _status, gateway

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

LEASE_S = 2.0  # replica A's lease: it lapses soon after A is stopped


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


def test_sigterm_past_the_grace_period_hands_the_response_to_the_other_replica(db_url, tmp_path):
    """A's response is still waiting for the model when its grace period ends: B, already
    running, resumes it within a couple of its 1 s claim sweeps — long before A's 60 s lease
    would have run out. (Two things free it at once: A releases its leases at the end of the
    grace period, and A's owner lock goes with its process; either alone suffices, so this
    shows the outcome, not which of the two gave it.)"""
    model = ScriptedModel()
    model.replies.append(Reply(content="too slow for the grace period", delay_s=5.0))
    model.replies.append(Reply(content="finished by replica B"))
    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        url_a, proc_a = stack.enter_context(gateway(
            db_url, f"{upstream}/v1", tmp_path / "a.log", STEPCHAIN_LEASE_S="60",
            STEPCHAIN_SHUTDOWN_GRACE_S="0.5",
        ))  # fmt: skip
        url_b, _ = stack.enter_context(
            gateway(db_url, f"{upstream}/v1", tmp_path / "b.log", STEPCHAIN_LEASE_S="60")
        )
        posted = httpx.post(f"{url_a}/v1/responses", timeout=30,
                            json={"model": MODEL, "input": "x", "background": True})  # fmt: skip
        assert posted.status_code == 200, posted.text
        response_id = posted.json()["id"]
        _wait(lambda: len(model.requests) >= 1, "A's model call")
        proc_a.send_signal(signal.SIGTERM)
        proc_a.wait(timeout=30)
        exited = time.time()
        _wait(lambda: httpx.get(f"{url_b}/v1/responses/{response_id}").json()["status"]
              == "completed", "B to finish the response", timeout_s=20)  # fmt: skip
        done = _status(db_url, response_id)
    record = done["record"]
    assert record.output[-1]["content"][0]["text"] == "finished by replica B"
    assert record.owner_epoch == 2  # one take-over: B's
    assert record.completed_at is not None and record.completed_at - exited < 10  # not 60 s
    assert [(s.kind, s.state) for s in done["steps"]] == [(MODEL_CALL, COMPLETED)]
    assert any(a.get("type") == "interrupted" for a in done["steps"][0].attempts)
    assert len(model.requests) == 2
