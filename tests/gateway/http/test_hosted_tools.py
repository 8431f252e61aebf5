"""Server-side tools end to end: registered HTTP tools and agent tools, driven by the real
openai SDK (and openai-agents) against a running gateway, with real tool servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from gateway.testing.serving import serve_app
from tests.gateway import harness
from tests.gateway.harness import gateway_on, running_gateway

# SDK round trips, streaming, tools and resilience on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
SECRET = "sk-very-secret-weather-key-123"
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class ToolServers:
    """Loopback tool servers: slow, failing, non-JSON, huge, and one checking a secret header."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()
        self.seen_keys: list[str | None] = []

        async def slow(request: Request) -> Response:
            city = (await request.json())["city"]
            self._mark("start", city)
            await asyncio.sleep(0.5)
            self._mark("end", city)
            self.seen_keys.append(request.headers.get("x-api-key"))
            return JSONResponse({"city": city, "celsius": 20 + len(city)})

        async def failing(request: Request) -> Response:
            return PlainTextResponse("upstream weather service exploded", status_code=500)

        async def text(request: Request) -> Response:
            return PlainTextResponse("plain words, not JSON")

        async def huge(request: Request) -> Response:
            return PlainTextResponse("x" * 1_100_000)

        self.app = Starlette(routes=[
            Route("/slow", slow, methods=["POST"]),
            Route("/failing", failing, methods=["POST"]),
            Route("/text", text, methods=["POST"]),
            Route("/huge", huge, methods=["POST"]),
        ])

    def _mark(self, what: str, city: str) -> None:
        with self.lock:
            self.log.append((what, city, time.monotonic()))


@pytest.fixture
def tools():
    servers = ToolServers()
    with serve_app(servers.app) as url:
        servers.url = url
        yield servers


def _register(gw, body, admin_key=None):
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    with gw.http() as http:
        reply = http.post("/v1/tools", json=body, headers=headers)
    assert reply.status_code == 201, reply.text
    return reply.json()


def _weather_tool(tools, name="get_weather", **extra):
    return {"name": name, "description": "Weather for a city", "parameters": CITY_SCHEMA,
            "kind": "http", "url": f"{tools.url}/slow", **extra}


def _answer_from_tools(body):
    results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
    return Reply(content="Answer: " + " | ".join(results))


def test_register_via_api_and_config_then_restart(tmp_path, tools, monkeypatch):
    config_tool = _weather_tool(tools, name="from_config")
    with running_gateway(tmp_path, tools=(config_tool,), admin_key="admin-1") as gw:
        created = _register(gw, _weather_tool(tools, name="from_api"), admin_key="admin-1")
        assert created["name"] == "from_api" and created["kind"] == "http"
        with gw.http() as http:
            assert http.get("/v1/tools").status_code == 401  # admin key required
            duplicate = http.post("/v1/tools", json=_weather_tool(tools, name="from_api"),
                                  headers={"Authorization": "Bearer admin-1"})
            assert duplicate.status_code == 409
            bad = http.post("/v1/tools", json={"name": "bad name!", "url": tools.url},
                            headers={"Authorization": "Bearer admin-1"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
        upstream = f"{gw.upstream_url}/v1"
    # A new gateway on the same database: both tools are still there.
    with gateway_on(gw.db, upstream, admin_key="admin-1") as (url, _):
        listed = httpx.get(f"{url}/v1/tools", headers={"Authorization": "Bearer admin-1"}).json()
    assert {t["name"] for t in listed["data"]} == {"from_api", "from_config"}


def test_streamed_parallel_tools_run_concurrently_and_show_live(tmp_path, tools):
    model = ScriptedModel(default=_answer_from_tools)
    model.replies.append(Reply(tool_calls=[
        {"id": "call_p", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "call_r", "name": "get_weather", "arguments": '{"city": "Rome"}'},
    ]))
    with running_gateway(tmp_path, model) as gw:
        _register(gw, _weather_tool(tools))
        with gw.client().responses.stream(model=MODEL, input="Weather in Paris and Rome?") as stream:
            events = list(stream)
            final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "mcp_call"]
    done = [e for e in events if e.type == "response.output_item.done" and e.item.type == "mcp_call"]
    assert len(added) == 2 and len(done) == 2
    assert all(e.item.status == "in_progress" for e in added)
    assert "response.mcp_call_arguments.delta" in types
    assert types.count("response.mcp_call.in_progress") == 2 and types.count("response.mcp_call.completed") == 2
    # The tool calls were open while the tools ran: added before done, output only on done.
    assert max(types.index("response.output_item.added"), 0) < types.index("response.mcp_call.completed")
    outputs = {e.item.name + e.item.arguments: e.item.output for e in done}
    assert outputs == {
        'get_weather{"city": "Paris"}': '{"city":"Paris","celsius":25}',
        'get_weather{"city": "Rome"}': '{"city":"Rome","celsius":24}',
    }
    # Concurrent: each tool started before the other ended (wall time ~ one tool, not two).
    starts = {c: t for w, c, t in tools.log if w == "start"}
    ends = {c: t for w, c, t in tools.log if w == "end"}
    assert starts["Paris"] < ends["Rome"] and starts["Rome"] < ends["Paris"]
    assert [item.type for item in final.output] == ["mcp_call", "mcp_call", "message"]
    assert final.output_text == 'Answer: {"city":"Paris","celsius":25} | {"city":"Rome","celsius":24}'
    assert final.usage.input_tokens > 0  # summed over both model calls


@pytest.mark.parametrize(
    ("path", "expect_status", "expect_in_message"),
    [
        pytest.param("/failing", "failed", "500", id="http-500"),
        pytest.param("/text", "completed", '{"result":"plain words, not JSON"}', id="non-json"),
        pytest.param("/huge", "failed", "returned more than 1000000 bytes", id="oversize"),
    ],
)
def test_tool_outcomes_reach_the_model(tmp_path, tools, path, expect_status, expect_in_message):
    model = ScriptedModel(default=_answer_from_tools)
    model.replies.append(Reply(tool_calls=[{"id": "call_t", "name": "t", "arguments": "{}"}]))
    with running_gateway(tmp_path, model, tool_max_response_bytes=1_000_000) as gw:
        _register(gw, {"name": "t", "description": "t", "url": f"{tools.url}{path}"})
        response = gw.client().responses.create(model=MODEL, input="use t")
    (item,) = [i for i in response.output if i.type == "mcp_call"]
    assert item.status == expect_status
    tool_message = model.requests[-1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_t"
    assert expect_in_message in tool_message["content"]
    if expect_status == "failed":
        assert item.error is not None and tool_message["content"].startswith("Error: ")
    assert response.status == "completed"


def test_attach_on_request_and_tool_choice_none(tmp_path, tools):
    with running_gateway(tmp_path) as gw:
        _register(gw, _weather_tool(tools, name="always_tool"))
        _register(gw, _weather_tool(tools, name="optional_tool", attach="on_request"))
        client = gw.client()
        gw.model.replies.extend([Reply(content="a"), Reply(content="b"), Reply(content="c")])
        client.responses.create(model=MODEL, input="x")
        assert [t["function"]["name"] for t in gw.model.requests[-1]["tools"]] == ["always_tool"]
        client.responses.create(model=MODEL, input="x",
                                tools=[{"type": "function", "name": "optional_tool"}])
        offered = gw.model.requests[-1]["tools"]
        assert {t["function"]["name"] for t in offered} == {"always_tool", "optional_tool"}
        assert next(t for t in offered if t["function"]["name"] == "optional_tool")["function"]["parameters"] == CITY_SCHEMA
        client.responses.create(model=MODEL, input="x", tool_choice="none")
        assert "tools" not in gw.model.requests[-1]


def _agent_script(body):
    messages = body["messages"]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    if results:
        return Reply(content=f"summary of {results[-1]}")
    names = [t["function"]["name"] for t in body.get("tools", [])]
    if messages[0].get("content") == "You are the forecaster.":
        return Reply(tool_calls=[{"id": "call_inner", "name": "get_weather", "arguments": '{"city": "Oslo"}'}])
    if "forecaster" in names:
        return Reply(tool_calls=[{"id": "call_outer", "name": "forecaster", "arguments": '{"input": "Oslo?"}'}])
    return Reply(content="no tools")


def test_agent_tool_with_its_own_http_tool_in_its_own_scope(tmp_path, tools):
    model = ScriptedModel(default=_agent_script)
    with running_gateway(tmp_path, model) as gw:
        _register(gw, _weather_tool(tools, attach="on_request"))
        _register(gw, {"name": "forecaster", "kind": "agent", "description": "Forecasts",
                       "model": MODEL, "instructions": "You are the forecaster.", "tools": ["get_weather"],
                       "attach": "always"})
        response = gw.client().responses.create(model=MODEL, input="Forecast for Oslo?")
        with gw.http() as http:
            top = http.get(f"/v1/responses/{response.id}/steps", params={"scope_parent": ""}).json()["data"]
            agent_step = next(s for s in top if s["request_payload"].get("name") == "forecaster")
            nested = http.get(f"/v1/responses/{response.id}/steps",
                              params={"scope_parent": agent_step["id"]}).json()["data"]
    assert response.status == "completed"
    assert [s["kind"] for s in top] == ["model_call", "tool_call", "model_call"]
    assert [s["kind"] for s in nested] == ["model_call", "tool_call", "model_call"]
    assert {s["scope_parent"] for s in nested} == {agent_step["id"]}
    assert agent_step["response_payload"] == 'summary of {"city":"Oslo","celsius":24}'
    assert response.output_text == 'summary of summary of {"city":"Oslo","celsius":24}'
    assert [i.type for i in response.output] == ["mcp_call", "message"]


def test_depth_and_iteration_caps(tmp_path, tools):
    def recurse(body):
        if any(m["role"] == "tool" for m in body["messages"]):
            return Reply(content="gave up")
        return Reply(tool_calls=[{"id": f"call_{len(body['messages'])}", "name": "again",
                                  "arguments": '{"input": "more"}'}])

    with running_gateway(tmp_path, ScriptedModel(default=recurse), max_response_step_depth=1) as gw:
        _register(gw, {"name": "again", "kind": "agent", "description": "recurses", "model": MODEL,
                       "instructions": "again", "tools": ["again"]})
        response = gw.client().responses.create(model=MODEL, input="go")
        with gw.http() as http:
            steps = http.get(f"/v1/responses/{response.id}/steps").json()["data"]
    assert response.status == "completed"
    failed = [s for s in steps if s["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"]["type"] == "max_depth_exceeded"

    loop_forever = ScriptedModel(default=lambda body: Reply(tool_calls=[
        {"id": f"call_{len(body['messages'])}", "name": "get_weather", "arguments": '{"city": "Nice"}'}]))
    with running_gateway(tmp_path / "iter", loop_forever, max_response_iterations=4) as gw:
        _register(gw, _weather_tool(tools))
        response = gw.client().responses.create(model=MODEL, input="forever")
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_iterations_exceeded"
    assert [i.type for i in response.output] == ["mcp_call", "mcp_call"]  # all output so far kept


def test_secrets_never_leave_the_gateway(tmp_path, tools, monkeypatch, caplog):
    monkeypatch.setenv("STEPCHAIN_TOOL_WEATHER_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    model = ScriptedModel(default=_answer_from_tools)
    model.replies.append(Reply(tool_calls=[{"id": "call_s", "name": "get_weather", "arguments": '{"city": "Bern"}'}]))
    with running_gateway(tmp_path, model) as gw:
        created = _register(gw, _weather_tool(tools, headers={"X-Api-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY",
                                                              "X-Literal": "literal-secret-456"}))
        response = gw.client().responses.create(model=MODEL, input="Bern?", stream=False)
        with gw.http() as http:
            bodies = [
                http.get("/v1/tools").text,
                http.get("/v1/tools/get_weather").text,
                http.get(f"/v1/responses/{response.id}").text,
                http.get(f"/v1/responses/{response.id}/steps").text,
            ]
    assert tools.seen_keys == [SECRET]  # the tool did receive it
    assert created["headers"] == {"X-Api-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY", "X-Literal": "***"}
    for text in [*bodies, response.model_dump_json(), caplog.text]:
        assert SECRET not in text and "literal-secret-456" not in text
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("stepchain.db*") if p.is_file())
    assert stored or harness.database_url  # on PostgreSQL the store is checked through the API only
    assert SECRET.encode() not in stored  # env secrets are never written; literal ones only in the tool row
    assert all(b"literal-secret-456" not in model_request for model_request in
               [str(r).encode() for r in model.requests])


def test_openai_agents_with_a_hosted_tool_and_a_client_tool(tmp_path, tools):
    pytest.importorskip("agents")
    from agents import (
        Agent,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    local_calls = []

    @function_tool
    def local_clock(timezone: str) -> str:
        """The time in a timezone."""
        local_calls.append(timezone)
        return "12:00"

    model = ScriptedModel()
    model.replies.extend([
        Reply(tool_calls=[
            {"id": "call_hosted", "name": "get_weather", "arguments": '{"city": "Lima"}'},
            {"id": "call_local", "name": "local_clock", "arguments": '{"timezone": "America/Lima"}'},
        ]),
        Reply(content="Sunny, and it is noon in Lima."),
    ])
    with running_gateway(tmp_path, model) as gw:
        _register(gw, _weather_tool(tools))

        async def main():
            client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
            agent = Agent(name="a", instructions="Be brief.", tools=[local_clock],
                          model=OpenAIResponsesModel(model=MODEL, openai_client=client))
            try:
                result = Runner.run_streamed(agent, "Weather and time in Lima?")
                async for _ in result.stream_events():
                    pass
                return result.final_output
            finally:
                await client.close()

        final = asyncio.run(main())
    assert final == "Sunny, and it is noon in Lima."
    assert local_calls == ["America/Lima"]  # only the client tool ran locally
    assert len(tools.seen_keys) == 1  # the hosted tool ran once, on the server
    last = model.requests[-1]["messages"]
    answered = {m["tool_call_id"]: m["content"] for m in last if m["role"] == "tool"}
    assert answered["call_local"] == "12:00"
    assert '"celsius":24' in next(v for k, v in answered.items() if k != "call_local")
