"""The response loop against a scripted upstream and HTTP tools, all real servers on loopback, on a
store on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from executors.http_tool import HTTPToolExecutor
from executors.registry import ToolRegistry
from executors.resilience import ResilientUpstream, UpstreamTarget
from gateway.engine.loop import LoopDeps, run_response_loop
from gateway.engine.transition import LoopRequest
from gateway.testing.scripted_upstream import (
    Reply,
    ScriptedModel,
    create_scripted_upstream,
)
from gateway.testing.serving import serve_app
from store import open_store
from store.types import (
    MODEL_CALL,
    TOOL_CALL,
    ResponseRecord,
    StepDescriptor,
    StoreError,
    new_id,
)
from tests.gateway import harness

# Each test's store is an SQLite file, then a PostgreSQL database (harness.database_url).
pytestmark = pytest.mark.usefixtures("on_both_backends")

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class ToolServer:
    """HTTP tools on loopback that log when each call starts and ends."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()
        self.on_call = None

        async def slow(request: Request) -> Response:
            args = await request.json()
            self._mark("start", args["city"])
            await asyncio.sleep(0.3)
            self._mark("end", args["city"])
            return JSONResponse({"city": args["city"], "celsius": len(args["city"])})

        async def broken(request: Request) -> Response:
            return Response("database on fire", status_code=500)

        async def hook(request: Request) -> Response:
            if self.on_call is not None:
                self.on_call()
            return JSONResponse({"ok": True})

        self.app = Starlette(
            routes=[
                Route("/weather", slow, methods=["POST"]),
                Route("/broken", broken, methods=["POST"]),
                Route("/hook", hook, methods=["POST"]),
            ]
        )

    def _mark(self, what: str, city: str) -> None:
        with self.lock:
            self.log.append((what, city, time.monotonic()))


@pytest.fixture
def servers():
    model = ScriptedModel()
    tools = ToolServer()
    with serve_app(create_scripted_upstream(model)) as upstream_url, serve_app(tools.app) as tools_url:
        yield model, tools, upstream_url, tools_url


@contextlib.asynccontextmanager
async def loop_deps(tmp_path, upstream_url, tools_url, *, definitions=(), **caps):
    store = open_store(str(harness.database_url or tmp_path / "loop.db"))
    await store.open()
    registry = ToolRegistry(store)
    for definition in [
        {"name": "get_weather", "url": f"{tools_url}/weather", "parameters": WEATHER_SCHEMA},
        {"name": "broken", "url": f"{tools_url}/broken"},
        {"name": "hook", "url": f"{tools_url}/hook"},
        *definitions,
    ]:
        await registry.register({"description": definition["name"], **definition})
    upstream = ResilientUpstream([UpstreamTarget(f"{upstream_url}/v1")], max_retries=0)
    http_tools = HTTPToolExecutor(allowed_networks=("127.0.0.0/8",))
    try:
        yield LoopDeps(store=store, upstream=upstream, registry=registry, http_tools=http_tools, **caps)
    finally:
        await upstream.aclose()
        await http_tools.aclose()
        await store.close()


async def new_response(store) -> str:
    response_id = new_id("resp")
    await store.create_response(ResponseRecord(id=response_id, model="m", request={"input": "x"}))
    return response_id


def body(text="hi", **extra: Any) -> dict[str, Any]:
    return {"model": "scripted-model", "messages": [{"role": "user", "content": text}], **extra}


def call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "name": name, "arguments": orjson.dumps(args).decode()}


def test_text_answer(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.replies.append(Reply(content="Just text."))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            outcome = await run_response_loop(deps, rid, LoopRequest(body()))
            return outcome, await deps.store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "completed" and outcome.final_text == "Just text."
    assert [(s.kind, s.state, s.sequence, s.prev_step_id) for s in chain] == [
        (MODEL_CALL, "completed", chain[0].sequence, None)
    ]
    assert chain[0].usage is not None and chain[0].attempt == 1


@pytest.mark.parametrize("stream", [pytest.param(False, id="plain"), pytest.param(True, id="streamed")])
def test_parallel_tool_calls_run_concurrently_and_feed_the_next_call(tmp_path, servers, stream):
    model, tools, upstream_url, tools_url = servers
    model.replies.append(
        Reply(tool_calls=[call("call_p", "get_weather", {"city": "Paris"}),
                          call("call_o", "get_weather", {"city": "Oslo"})])
    )
    model.replies.append(Reply(content="Paris 5, Oslo 4."))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
            outcome = await run_response_loop(deps, rid, LoopRequest(body(**extra)))
            return outcome, await deps.store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "completed" and outcome.final_text == "Paris 5, Oslo 4."
    assert [s.kind for s in chain] == [MODEL_CALL, TOOL_CALL, TOOL_CALL, MODEL_CALL]
    # Siblings are chained one after another; sequences strictly increase.
    assert [s.prev_step_id for s in chain] == [None, chain[0].id, chain[1].id, chain[2].id]
    assert [s.sequence for s in chain] == sorted({s.sequence for s in chain})
    assert [s.request_payload["call_id"] for s in chain[1:3]] == ["call_p", "call_o"]
    # Concurrent: each tool started before the other one ended.
    starts = {city: t for what, city, t in tools.log if what == "start"}
    ends = {city: t for what, city, t in tools.log if what == "end"}
    assert starts["Paris"] < ends["Oslo"] and starts["Oslo"] < ends["Paris"]
    follow_up = model.requests[-1]["messages"]
    assert follow_up[-2:] == [
        {"role": "tool", "tool_call_id": "call_p", "content": '{"city":"Paris","celsius":5}'},
        {"role": "tool", "tool_call_id": "call_o", "content": '{"city":"Oslo","celsius":4}'},
    ]


def test_tool_failure_reaches_the_next_model_call(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.replies.append(Reply(tool_calls=[call("call_b", "broken", {}), call("call_x", "nonexistent", {})]))
    model.replies.append(Reply(content="Sorry, the tool failed."))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            outcome = await run_response_loop(deps, rid, LoopRequest(body()))
            return outcome, await deps.store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "completed"
    assert [s.state for s in chain] == ["completed", "failed", "failed", "completed"]
    assert chain[1].error["type"] == "http_error" and "500" in chain[1].error["message"]
    assert chain[2].error == {"type": "unknown_tool", "message": "unknown tool: nonexistent"}
    tool_messages = model.requests[-1]["messages"][-2:]
    assert tool_messages[0]["tool_call_id"] == "call_b"
    assert tool_messages[0]["content"].startswith("Error: ") and "500" in tool_messages[0]["content"]
    assert tool_messages[1] == {
        "role": "tool", "tool_call_id": "call_x", "content": "Error: unknown tool: nonexistent"
    }


def test_invalid_arguments_fail_the_step_with_a_message_the_model_sees(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.replies.append(
        Reply(tool_calls=[{"id": "call_j", "name": "get_weather", "arguments": '{"city": '},
                          call("call_s", "get_weather", {"town": "Rome"})])
    )
    model.replies.append(Reply(content="Let me fix that."))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            await run_response_loop(deps, rid, LoopRequest(body()))
            return await deps.store.list_chain(rid)

    chain = asyncio.run(main())
    assert [s.error["type"] for s in chain[1:3]] == ["invalid_arguments", "invalid_arguments"]
    assert "city" in chain[2].error["message"]


def test_iteration_cap_ends_incomplete_and_keeps_the_chain(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.default = lambda _body: Reply(tool_calls=[call(new_id("call"), "hook", {})])

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url, max_iterations=5) as deps:
            rid = await new_response(deps.store)
            outcome = await run_response_loop(deps, rid, LoopRequest(body(), max_iterations=5))
            return outcome, await deps.store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "incomplete" and outcome.incomplete_reason == "max_iterations_exceeded"
    assert [s.kind for s in chain] == [MODEL_CALL, TOOL_CALL] * 2 + [MODEL_CALL]
    assert all(s.state == "completed" for s in chain)


def _agent_script(body: dict[str, Any]) -> Reply:
    """Sub-agents call their tool once, then answer with what it said; the top level likewise."""
    messages = body["messages"]
    tool_results = [m for m in messages if m["role"] == "tool"]
    if tool_results:
        return Reply(content=f"done: {tool_results[-1]['content']}")
    names = [t["function"]["name"] for t in body.get("tools", [])]
    if "get_weather" in names:
        return Reply(tool_calls=[call(new_id("call"), "get_weather", {"city": "Rome"})])
    if "deeper" in names:
        return Reply(tool_calls=[call(new_id("call"), "deeper", {"input": "go on"})])
    return Reply(content="no tools")


def test_agent_tool_runs_a_nested_loop_in_its_own_scope(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.default = _agent_script
    forecaster = {
        "name": "forecaster", "kind": "agent", "model": "scripted-model",
        "instructions": "You forecast.", "tools": ["get_weather"],
    }

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url, definitions=[forecaster]) as deps:
            rid = await new_response(deps.store)
            request = LoopRequest(body(tools=[{"type": "function", "function": {"name": "forecaster"}}]))
            model.replies.append(Reply(tool_calls=[call("call_f", "forecaster", {"input": "Rome?"})]))
            outcome = await run_response_loop(deps, rid, request)
            top = await deps.store.list_chain(rid)
            nested = await deps.store.list_chain(rid, top[1].id)
            return outcome, top, nested, await deps.store.list_steps(rid)

    outcome, top, nested, every = asyncio.run(main())
    assert outcome.status == "completed"
    assert [s.kind for s in top] == [MODEL_CALL, TOOL_CALL, MODEL_CALL]
    assert top[1].response_payload == 'done: {"city":"Rome","celsius":4}'
    assert [s.kind for s in nested] == [MODEL_CALL, TOOL_CALL, MODEL_CALL]
    assert {s.scope_parent for s in nested} == {top[1].id}
    assert not {s.id for s in nested} & {s.id for s in top}
    assert len(every) == 6
    assert nested[0].request_payload["messages"][0] == {"role": "system", "content": "You forecast."}


def test_depth_cap_fails_only_the_agent_step_too_deep(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.default = _agent_script
    deeper = {"name": "deeper", "kind": "agent", "model": "scripted-model",
              "instructions": "Go deeper.", "tools": ["deeper"]}

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url, definitions=[deeper], max_depth=2) as deps:
            rid = await new_response(deps.store)
            request = LoopRequest(body(tools=[{"type": "function", "function": {"name": "deeper"}}]))
            outcome = await run_response_loop(deps, rid, request)
            return outcome, await deps.store.list_steps(rid)

    outcome, steps = asyncio.run(main())
    assert outcome.status == "completed"
    agent_steps = [s for s in steps if s.kind == TOOL_CALL]
    # depth 0 calls deeper (depth 1), which calls deeper (depth 2), whose call would be depth 3.
    assert len(agent_steps) == 3
    too_deep = [s for s in agent_steps if s.state == "failed"]
    assert len(too_deep) == 1 and too_deep[0].error["type"] == "max_depth_exceeded"
    assert sum(s.state == "completed" for s in agent_steps) == 2
    # The failure went back to the calling model as a tool message.
    assert any(
        m["role"] == "tool" and "max_response_step_depth" in m["content"]
        for r in model.requests for m in r["messages"]
    )


def test_resume_from_a_partial_chain(tmp_path, servers):
    """A chain left by a dead process: one tool done, one never started, continue from there."""
    model, tools, upstream_url, tools_url = servers
    model.replies.append(Reply(content="Both cities done."))
    first_call = {
        "id": "c", "object": "chat.completion", "created": 0, "model": "scripted-model",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Bern"}'}},
            ]}}],
    }

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            store = deps.store
            rid = await new_response(store)
            (m,) = await store.record_steps(rid, None, None, [StepDescriptor(MODEL_CALL, body())])
            await store.mark_processing(m.id)
            await store.complete_step(m.id, first_call)
            t1, t2 = await store.record_steps(rid, None, m.id, [
                StepDescriptor(TOOL_CALL, {"name": "get_weather", "call_id": "call_1", "arguments": '{"city":"Rome"}'}),
                StepDescriptor(TOOL_CALL, {"name": "get_weather", "call_id": "call_2", "arguments": '{"city":"Bern"}'}),
            ])
            await store.mark_processing(t1.id)
            await store.complete_step(t1.id, {"city": "Rome", "celsius": 4})
            outcome = await run_response_loop(deps, rid, LoopRequest(body()))
            return outcome, await store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "completed" and outcome.final_text == "Both cities done."
    assert [s.state for s in chain] == ["completed"] * 4
    assert [city for what, city, _ in tools.log if what == "start"] == ["Bern"]  # Rome not re-run
    assert len(model.requests) == 1  # only the follow-up call
    assert [m["tool_call_id"] for m in model.requests[0]["messages"][-2:]] == ["call_1", "call_2"]


def test_resume_reruns_an_interrupted_model_call(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.replies.append(Reply(content="Recovered."))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            (m,) = await deps.store.record_steps(rid, None, None, [StepDescriptor(MODEL_CALL, body())])
            await deps.store.mark_processing(m.id)  # then the process "died"
            outcome = await run_response_loop(deps, rid, LoopRequest(body()))
            return outcome, await deps.store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "completed" and outcome.final_text == "Recovered."
    assert len(chain) == 1 and chain[0].attempts[0]["type"] == "interrupted"


def test_failed_model_call_fails_the_loop_and_keeps_the_step(tmp_path, servers):
    model, _, upstream_url, tools_url = servers
    model.replies.append(Reply(status=503))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            outcome = await run_response_loop(deps, rid, LoopRequest(body()))
            return outcome, await deps.store.list_chain(rid)

    outcome, chain = asyncio.run(main())
    assert outcome.status == "failed" and outcome.error["status"] == 503
    assert chain[0].state == "failed"


def test_store_error_stops_the_loop(tmp_path, servers):
    model, tools, upstream_url, tools_url = servers
    model.replies.append(Reply(tool_calls=[call("call_h", "hook", {})]))
    model.replies.append(Reply(content="never reached"))

    async def main():
        async with loop_deps(tmp_path, upstream_url, tools_url) as deps:
            rid = await new_response(deps.store)
            loop = asyncio.get_running_loop()
            # The store goes away while the tool runs: completing the step must fail loudly.
            tools.on_call = lambda: asyncio.run_coroutine_threadsafe(deps.store.close(), loop).result(5)
            with pytest.raises(StoreError):
                await run_response_loop(deps, rid, LoopRequest(body()))

    asyncio.run(main())
    assert len(model.requests) == 1
