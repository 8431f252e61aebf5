"""Remote MCP tool sources end to end: real MCP servers (the ``mcp`` SDK's MCPServer, streamable
HTTP on 127.0.0.1), a running gateway, the real openai SDK and openai-agents."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError as MCPToolFailure

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from gateway.testing.serving import serve_app
from tests.gateway.harness import running_gateway

# Run on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"


class Servers:
    """Two MCP servers on loopback: ``calc`` (add, a failing tool, a slow one) and ``notes``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.slow_started = threading.Event()
        calc = MCPServer("calc")

        @calc.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            self._note("add", {"a": a, "b": b})
            return a + b

        @calc.tool()
        def explode() -> str:
            """A tool whose backend is down."""
            self._note("explode", {})
            raise MCPToolFailure("the calculator backend is down")

        @calc.tool()
        async def slow(seconds: float) -> str:
            """Sleeps."""
            self._note("slow", {"seconds": seconds})
            self.slow_started.set()
            await asyncio.sleep(seconds)
            return "woke up"

        notes = MCPServer("notes")

        @notes.tool()
        def add_note(text: str) -> str:
            """Store a note."""
            self._note("add_note", {"text": text})
            return f"stored: {text}"

        self.calc_app = calc.streamable_http_app()
        self.notes_app = notes.streamable_http_app()

    def _note(self, name: str, args: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append((name, args))


@pytest.fixture
def servers() -> Iterator[Servers]:
    found = Servers()
    with serve_app(found.calc_app) as calc, serve_app(found.notes_app) as notes:
        found.calc_url = f"{calc}/mcp"  # type: ignore[attr-defined]
        found.notes_url = f"{notes}/mcp"  # type: ignore[attr-defined]
        yield found


def _mcp(url: str, label: str = "calc", **fields: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": label, "server_url": url, **fields}


def _tool_messages(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m.get("role") == "tool"]


def _last_tool_answer(body: dict[str, Any]) -> Reply:
    return Reply(content="tools said: " + " | ".join(_tool_messages(body)))


def test_listing_calls_and_failures_through_the_openai_sdk(tmp_path, servers):
    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[
        {"id": "c1", "name": "add", "arguments": '{"a": 2, "b": 40}'},
        {"id": "c2", "name": "explode", "arguments": "{}"},
        {"id": "c3", "name": "slow", "arguments": '{"seconds": 30}'},
    ]))
    tools = [_mcp(servers.calc_url, require_approval="never", headers={"X-Trace": "t1"},
                  allowed_tools=["add", "explode", "slow"], authorization="oauth-token-xyz")]
    # A short MCP timeout: the slow tool times out (and reaches the model as its error).
    with running_gateway(tmp_path, model, mcp_timeout_s=3) as gw:
        response = gw.client().responses.create(model=MODEL, input="add 2 and 40", tools=tools)
    types = [item.type for item in response.output]
    assert types == ["mcp_list_tools", "mcp_call", "mcp_call", "mcp_call", "message"]
    listing = response.output[0]
    assert listing.server_label == "calc"
    assert sorted(t.name for t in listing.tools) == ["add", "explode", "slow"]
    calls = {item.name: item for item in response.output if item.type == "mcp_call"}
    assert calls["add"].output == "42" and calls["add"].status == "completed"
    assert calls["add"].server_label == "calc"
    assert calls["explode"].status == "failed"
    assert "backend is down" in str(calls["explode"].error)
    assert calls["slow"].status == "failed" and "within 3 s" in str(calls["slow"].error)
    # The model saw the listed tools as functions, and each outcome as its tool message.
    first = model.requests[0]
    assert sorted(t["function"]["name"] for t in first["tools"]) == ["add", "explode", "slow"]
    said = _tool_messages(model.requests[1])
    assert said[0] == "42"
    assert said[1].startswith("Error:") and "backend is down" in said[1]
    assert said[2].startswith("Error:") and "did not run 'slow' within 3 s" in said[2]
    # Credentials are never echoed.
    echoed = response.tools[0]
    assert getattr(echoed, "authorization", None) is None
    assert echoed.headers == {"X-Trace": "***"}


def test_follow_up_reuses_the_listing_and_allowed_tools_filter(tmp_path, servers):
    model = ScriptedModel(default=lambda body: Reply(content="ok"))
    with running_gateway(tmp_path, model) as gw:
        client = gw.client()
        tools = [_mcp(servers.calc_url, allowed_tools=["add"], require_approval="never")]
        first = client.responses.create(model=MODEL, input="hi", tools=tools)
        assert [i.type for i in first.output] == ["mcp_list_tools", "message"]
        assert [t.name for t in first.output[0].tools] == ["add"]
        second = client.responses.create(
            model=MODEL, input="again", tools=tools, previous_response_id=first.id
        )
    # Listed once per chain: the follow-up has no listing item, yet offers the same tools.
    assert [i.type for i in second.output] == ["message"]
    assert [t["function"]["name"] for t in model.requests[1]["tools"]] == ["add"]


def test_streaming_events(tmp_path, servers):
    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[
        {"id": "c1", "name": "add", "arguments": '{"a": 1, "b": 2}'},
        {"id": "c2", "name": "add_note", "arguments": '{"text": "hi"}'},
    ]))
    with running_gateway(tmp_path, model) as gw:
        tools = [_mcp(servers.calc_url, require_approval="never"),
                 _mcp(servers.notes_url, label="notes", require_approval="never")]
        with gw.client().responses.stream(model=MODEL, input="go", tools=tools) as stream:
            events = list(stream)
            final = stream.get_final_response()
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types.count("response.mcp_list_tools.in_progress") == 2
    assert types.count("response.mcp_list_tools.completed") == 2
    assert types.count("response.mcp_call.completed") == 2
    assert "response.mcp_call_arguments.delta" in types and "response.mcp_call_arguments.done" in types
    labels = {i.name: i.server_label for i in final.output if i.type == "mcp_call"}
    assert labels == {"add": "calc", "add_note": "notes"}
    assert final.output[-1].content[0].text == "tools said: 3 | stored: hi"


def test_approval_round_trip_with_the_openai_sdk(tmp_path, servers):
    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[
        {"id": "c1", "name": "add", "arguments": '{"a": 5, "b": 6}'},
        {"id": "c2", "name": "add_note", "arguments": '{"text": "secret plan"}'},
    ]))
    with running_gateway(tmp_path, model) as gw:
        client = gw.client()
        tools = [_mcp(servers.calc_url, require_approval="always"),
                 _mcp(servers.notes_url, label="notes",
                      require_approval={"always": {"tool_names": ["add_note"]}})]
        first = client.responses.create(model=MODEL, input="add and note", tools=tools)
        requests = [i for i in first.output if i.type == "mcp_approval_request"]
        assert first.status == "completed"
        assert {(r.server_label, r.name) for r in requests} == {("calc", "add"), ("notes", "add_note")}
        assert servers.calls == []  # nothing ran before the approval
        by_name = {r.name: r for r in requests}
        second = client.responses.create(
            model=MODEL,
            previous_response_id=first.id,
            tools=tools,
            input=[
                {"type": "mcp_approval_response", "approval_request_id": by_name["add"].id,
                 "approve": True},
                {"type": "mcp_approval_response", "approval_request_id": by_name["add_note"].id,
                 "approve": False, "reason": "not today"},
            ],
        )
        # Answering the same approval again (a client resending everything) runs nothing twice.
        third = client.responses.create(
            model=MODEL, previous_response_id=second.id, tools=tools,
            input=[{"type": "mcp_approval_response", "approval_request_id": by_name["add"].id,
                    "approve": True}],
        )
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(
                model=MODEL, previous_response_id=first.id, tools=tools,
                input=[{"type": "mcp_approval_response", "approval_request_id": "mcpr_nope",
                        "approve": True}],
            )
    assert bad.value.status_code == 400
    assert servers.calls == [("add", {"a": 5, "b": 6})]
    calls = {i.name: i for i in second.output if i.type == "mcp_call"}
    assert calls["add"].output == "11" and calls["add"].approval_request_id == by_name["add"].id
    assert calls["add_note"].status == "failed" and "denied" in str(calls["add_note"].error)
    said = _tool_messages(model.requests[1])
    assert said[0] == "11" and "denied" in said[1] and "not today" in said[1]
    assert [i.type for i in third.output] == ["message"]


def test_client_supplied_loopback_url_is_refused_by_default(tmp_path, servers):
    model = ScriptedModel(default=lambda body: Reply(content="never"))
    with running_gateway(tmp_path, model, tool_allowed_networks=None) as gw:
        with pytest.raises(openai.APIStatusError) as info:
            gw.client().responses.create(
                model=MODEL, input="hi", tools=[_mcp(servers.calc_url, require_approval="never")]
            )
    assert info.value.status_code == 424
    assert "loopback" in info.value.message
    assert model.requests == []


def test_registered_mcp_server(tmp_path, servers):
    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "add_note", "arguments": '{"text": "x"}'}]))
    with running_gateway(tmp_path, model, tool_allowed_networks=None, admin_key="adm") as gw:
        with gw.http() as http:
            created = http.post(
                "/v1/tools",
                headers={"Authorization": "Bearer adm"},
                json={"name": "notes", "kind": "mcp", "server_url": servers.notes_url,
                      "require_approval": "never", "allow_private": True},
            )
            assert created.status_code == 201, created.text
        response = gw.client().responses.create(model=MODEL, input="note x")
    assert [i.type for i in response.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert response.output[1].server_label == "notes" and response.output[1].output == "stored: x"


def test_openai_agents_hosted_mcp_tool_with_approval_callback(tmp_path, servers):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "add", "arguments": '{"a": 20, "b": 22}'}]))
    seen: list[str] = []

    def approve(request: Any) -> Any:
        seen.append(request.data.name)
        return {"approve": True}

    with running_gateway(tmp_path, model) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="test", max_retries=0)
        agent = agents.Agent(
            name="calc",
            instructions="Use the calculator.",
            model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
            tools=[agents.HostedMCPTool(
                tool_config={"type": "mcp", "server_label": "calc", "server_url": servers.calc_url,
                             "require_approval": "always"},
                on_approval_request=approve,
            )],
        )

        async def run() -> Any:
            try:
                return await agents.Runner.run(agent, "add 20 and 22")
            finally:
                await client.close()

        result = asyncio.run(run())
    assert seen == ["add"]
    assert servers.calls == [("add", {"a": 20, "b": 22})]
    assert result.final_output == "tools said: 42"


def test_mcp_servers_from_the_config_on_request(tmp_path, servers):
    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "add", "arguments": '{"a": 1, "b": 1}'}]))
    config = [{"server_label": "calc", "server_url": servers.calc_url, "attach": "on_request",
               "require_approval": "never", "allow_private": True, "allowed_tools": ["add"]}]
    with running_gateway(tmp_path, model, tool_allowed_networks=None, mcp_servers=config) as gw:
        client = gw.client()
        named = client.responses.create(
            model=MODEL, input="add", tools=[{"type": "mcp", "server_label": "calc"}]
        )
        plain = client.responses.create(model=MODEL, input="no tools")
    assert [i.type for i in plain.output] == ["message"]  # on_request: not attached
    assert "tools" not in model.requests[-1]
    assert [i.type for i in named.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert named.output[1].output == "2"


def test_registered_http_tool_with_require_approval(tmp_path):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    ran: list[Any] = []

    async def transfer(request: Request) -> JSONResponse:
        ran.append(await request.json())
        return JSONResponse({"ok": True})

    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "transfer", "arguments": '{"eur": 5}'}]))
    with serve_app(Starlette(routes=[Route("/t", transfer, methods=["POST"])])) as tool_url, \
            running_gateway(tmp_path, model) as gw:
        with gw.http() as http:
            assert http.post("/v1/tools", json={
                "name": "transfer", "url": f"{tool_url}/t", "require_approval": "always",
            }).status_code == 201
        client = gw.client()
        first = client.responses.create(model=MODEL, input="send 5 eur")
        request = first.output[-1]
        assert request.type == "mcp_approval_request" and request.name == "transfer"
        assert ran == []
        second = client.responses.create(
            model=MODEL, previous_response_id=first.id,
            input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}],
        )
    assert ran == [{"eur": 5}]
    assert [i.type for i in second.output] == ["mcp_call", "message"]
    assert second.output[-1].content[0].text == 'tools said: {"ok":true}'


def test_older_sse_server(tmp_path):
    legacy = MCPServer("legacy")

    @legacy.tool()
    def shout(text: str) -> str:
        """Upper-case it."""
        return text.upper()

    model = ScriptedModel(default=_last_tool_answer)
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "shout", "arguments": '{"text": "hi"}'}]))
    with serve_app(legacy.sse_app()) as url, running_gateway(tmp_path, model) as gw:
        response = gw.client().responses.create(
            model=MODEL, input="shout",
            tools=[_mcp(f"{url}/sse", label="legacy", require_approval="never")],
        )
    assert [i.type for i in response.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert response.output[1].output == "HI"
