"""A response taken over by another process while this one runs it (issue 11): this process's
next write is refused (``FencedError``) and its loop stops — logged as one warning, without a
traceback, and without writing anything more. Concurrent tool steps (a TaskGroup) surface the
refusal as an exception group of FencedErrors, which is a take-over too, not an "unexpected
failure".

Real gateway (in-process uvicorn, so ``caplog`` sees its records) on both backends, a real HTTP
tool server, and a real take-over: a second store ("replica B") registers as an owner and
claims the response with ``Store.claim_responses`` once its lease has lapsed, as a replica's
recovery sweep does.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.engine.driving import _taken_over
from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from store import open_store
from store.types import FencedError, StoreError
from tests.gateway.harness import gateway_on

TOOLS = ("lookup_a", "lookup_b")


def _script(body: dict) -> Reply:
    if any(m["role"] == "tool" for m in body["messages"]):
        return Reply(content="never reached: the response was taken over")
    return Reply(tool_calls=[
        {"id": f"call_{i}", "name": name, "arguments": "{}"} for i, name in enumerate(TOOLS)
    ])  # fmt: skip


def _expire_lease(db: str, response_id: str) -> None:
    """Make the response's owner look hung (its lease lapsed), so another owner may claim it."""
    update = "UPDATE responses SET lease_expires_at = 0 WHERE id = ?"
    if db.startswith("postgresql://"):
        with psycopg.connect(db) as pg:
            pg.execute(update.replace("?", "%s"), (response_id,))
    else:
        with sqlite3.connect(db) as conn:
            conn.execute(update, (response_id,))


def test_concurrent_tool_steps_refused_by_the_fence_stop_the_loop_quietly(db_url, caplog):
    caplog.set_level(logging.INFO, logger="stepchain")
    arrived: list[str] = []
    release = threading.Event()

    async def tool(request: Request) -> JSONResponse:
        arrived.append(request.url.path)
        await asyncio.to_thread(release.wait, 60)  # until replica B has taken the response
        return JSONResponse({"answer": 42})

    tool_app = Starlette(routes=[Route("/tool/{name}", tool, methods=["POST"])])
    model = ScriptedModel(default=_script)
    with serve_app(create_scripted_upstream(model)) as upstream, serve_app(tool_app) as tools, \
            gateway_on(db_url, f"{upstream}/v1") as (url, _settings):  # fmt: skip

        async def main() -> tuple[str, dict, dict, int]:
            replica_b = open_store(db_url)
            await replica_b.open()
            try:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    for name in TOOLS:
                        created = await client.post("/v1/tools", json={
                            "name": name, "description": "d", "url": f"{tools}/tool/{name}",
                        })  # fmt: skip
                        assert created.status_code == 201, created.text
                    posted = await client.post("/v1/responses", json={
                        "model": "scripted-model", "input": "go", "background": True,
                    })  # fmt: skip
                    assert posted.status_code == 200, posted.text
                    response_id = posted.json()["id"]
                deadline = time.monotonic() + 30
                while len(arrived) < len(TOOLS):  # both tool steps run, concurrently
                    assert time.monotonic() < deadline, arrived
                    await asyncio.sleep(0.02)
                await replica_b.register_owner("replica-b")
                claimed: list = []
                while not claimed:  # the owner may renew its lease in between: again
                    assert time.monotonic() < deadline
                    await asyncio.to_thread(_expire_lease, db_url, response_id)
                    claimed = await replica_b.claim_responses("replica-b", 600)
                assert [r.id for r in claimed] == [response_id]
                before = await _state(replica_b, response_id)
                release.set()  # the tools answer: the owner's next writes meet the fence
                deadline = time.monotonic() + 30
                while not any("taken over" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, caplog.text
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # anything it would still write, it writes now
                after = await _state(replica_b, response_id)
                # Counted before B lets go: once B's owner is released, this gateway sees a
                # dead owner and rightly resumes the response (a second model call).
                model_calls = len(model.requests)
                await replica_b.release_owner("replica-b")
                return response_id, before, after, model_calls
            finally:
                release.set()
                await replica_b.close()

        response_id, before, after, model_calls = asyncio.run(main())
    ours = [r for r in caplog.records if r.name.startswith("stepchain")]
    taken = [r for r in ours if "taken over" in r.getMessage()]
    assert [r.getMessage() for r in taken] == [
        f"response {response_id} was taken over by another process; this process stops its loop"
    ]
    assert taken[0].levelno in (logging.INFO, logging.WARNING) and taken[0].exc_info is None
    assert not [r for r in ours if r.levelno >= logging.ERROR], caplog.text
    assert "failed unexpectedly" not in caplog.text and "Traceback" not in caplog.text
    # Nothing written after the take-over: B's claim is the last change.
    assert after == before
    assert after["record"] == ("in_progress", "replica-b", 2)
    assert [state for _kind, state in after["steps"]] == ["completed", "processing", "processing"]
    assert model_calls == 1  # the loop did not go on to the next model call


async def _state(store, response_id: str) -> dict:
    record = await store.get_response(response_id)
    steps = await store.list_steps(response_id)
    return {
        "record": (record.status, record.owner, record.owner_epoch),
        "steps": [(s.kind, s.state) for s in steps],
        "events": await store.list_events(response_id),
        "output": record.output,
    }


@pytest.mark.parametrize(
    "exc, taken_over",
    [
        pytest.param(FencedError("x"), True, id="bare"),
        pytest.param(ExceptionGroup("g", [FencedError("a"), FencedError("b")]), True, id="group"),
        pytest.param(ExceptionGroup("g", [ExceptionGroup("h", [FencedError("a")])]), True, id="nested"),
        pytest.param(ExceptionGroup("g", [FencedError("a"), StoreError("b")]), False, id="mixed"),
        pytest.param(ExceptionGroup("g", [ValueError("a")]), False, id="other-group"),
        pytest.param(StoreError("x"), False, id="other"),
    ],
)
def test_what_counts_as_a_take_over(exc: BaseException, taken_over: bool) -> None:
    found = _taken_over(exc)
    assert isinstance(found, FencedError) if taken_over else found is None
