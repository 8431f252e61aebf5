"""Recorded request bodies of real clients replayed through a real gateway, turn after turn.

The bodies in ``tests/fixtures/clients/`` are written from the clients' public source (see the
README there): Codex CLI (``namespace``, ``custom`` apply_patch and ``web_search`` tools,
``store: false``, ``include: ["reasoning.encrypted_content"]``, ``prompt_cache_key``, its output
items and reasoning sent back) and the Vercel AI SDK's ``@ai-sdk/openai`` Responses provider
(``item_reference`` inputs for earlier output, ``store`` on by default). Every turn must get a
200 and a stream whose every event validates (Open Responses schema and openai SDK types); the
next turn is built the way the client builds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import ResponseItem
from pydantic import TypeAdapter

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from tests.gateway.harness import running_gateway

from .test_conformance import KEY, check_all

# Every gateway here runs once on SQLite, once on PostgreSQL.
pytestmark = pytest.mark.usefixtures("on_both_backends")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "clients"
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch\n"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def codex_item(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as Codex CLI sends it back with ``store: false`` (no ids; it keeps the
    reasoning's ``encrypted_content``, a call's ``namespace``, a message's ``phase``)."""
    keep = {
        "reasoning": ("type", "summary", "content", "encrypted_content"),
        "message": ("type", "role", "content", "phase"),
        "function_call": ("type", "name", "namespace", "arguments", "call_id"),
        "custom_tool_call": ("type", "status", "call_id", "name", "input"),
    }[item["type"]]
    sent = {key: item[key] for key in keep if key in item}
    if item["type"] == "reasoning":
        sent["content"] = None
    if item["type"] == "message":
        sent["content"] = [{"type": "output_text", "text": item["content"][0]["text"]}]
    return sent


@pytest.mark.parametrize("mode", ["encrypted", "off"])
def test_codex_cli_turns(tmp_path, mode):
    first = fixture("codex_cli.turn1.json")
    calls = [
        {"id": "call_patch", "name": "apply_patch", "arguments": json.dumps({"input": PATCH})},
        {"id": "call_docs", "name": "mcp__docs__search", "arguments": '{"query": "README"}'},
        {"id": "call_sh", "name": "shell_command", "arguments": '{"command": "make test"}'},
    ]
    model = ScriptedModel(
        [
            Reply(reasoning="I should add the file first.", content="Adding it.", tool_calls=calls),
            Reply(reasoning="All three worked.", content="Done: hello.txt added, tests pass."),
        ]
    )
    with running_gateway(
        tmp_path, model, encrypted_content_key=KEY, reasoning_to_upstream=mode
    ) as gw:
        events = check_all(gw, first)
        output = events[-1]["response"]["output"]
        assert [i["type"] for i in output] == [
            "reasoning", "message", "custom_tool_call", "function_call", "function_call",
        ]
        reasoning, message, patch, docs, shell = output
        assert reasoning["encrypted_content"] and message["phase"] == "commentary"
        assert (patch["name"], patch["input"]) == ("apply_patch", PATCH)
        assert (docs["name"], docs["namespace"]) == ("search", "mcp__docs")
        sent = model.requests[0]
        assert "stepchain" not in sent
        offered = {t["function"]["name"]: t["function"] for t in sent["tools"]}
        assert sorted(offered) == [
            "apply_patch", "mcp__docs__search", "shell_command", "update_plan", "view_image",
        ]  # web_search: left out, nothing runs it
        assert "lark grammar" in offered["apply_patch"]["description"]
        assert offered["apply_patch"]["parameters"]["required"] == ["input"]

        second = dict(first)
        second["input"] = [
            *first["input"],
            *(codex_item(item) for item in output),
            {"type": "custom_tool_call_output", "call_id": "call_patch", "output": "Success."},
            {"type": "function_call_output", "call_id": "call_docs", "output": "README: hi"},
            {"type": "function_call_output", "call_id": "call_sh", "output": "ok"},
        ]
        events = check_all(gw, second)
    assert events[-1]["response"]["status"] == "completed"
    messages = model.requests[1]["messages"]
    assistant = next(m for m in messages if m["role"] == "assistant")
    if mode == "encrypted":  # the default: what the client round-trips goes back upstream
        assert assistant["reasoning_content"] == "I should add the file first."
    else:
        assert "reasoning_content" not in assistant
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == [
        "apply_patch", "mcp__docs__search", "shell_command",
    ]
    assert [m["content"] for m in messages[-3:]] == ["Success.", "README: hi", "ok"]


def test_vercel_ai_sdk_item_references(tmp_path):
    first = fixture("vercel_ai_sdk.turn1.json")
    call = {"id": "call_w", "name": "weather", "arguments": '{"location": "Berlin"}'}
    model = ScriptedModel(
        [
            Reply(reasoning="Use the weather tool.", tool_calls=[call]),
            Reply(content="It is 21 degrees in Berlin."),
            Reply(content="Tomorrow looks the same."),
        ]
    )
    with running_gateway(tmp_path, model) as gw:
        events = check_all(gw, first)
        reasoning, function_call = events[-1]["response"]["output"]
        second = dict(first)
        second["input"] = [
            *first["input"],
            {"type": "item_reference", "id": reasoning["id"]},
            {"type": "item_reference", "id": function_call["id"]},
            {"type": "function_call_output", "call_id": "call_w", "output": '{"celsius": 21}'},
        ]
        events = check_all(gw, second)
        (answer,) = events[-1]["response"]["output"]
        third = dict(first)
        third["input"] = [
            *second["input"],
            {"type": "item_reference", "id": answer["id"]},
            {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]},
        ]
        check_all(gw, third)
        with gw.http() as http:
            unknown = dict(first, stream=False)
            unknown["input"] = [*first["input"], {"type": "item_reference", "id": "msg_0123abcd"}]
            reply = http.post("/v1/responses", json=unknown)
            listed = http.get(f"/v1/responses/{events[-1]['response']['id']}/input_items")
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "input[2].id"
    assert listed.status_code == 200
    items = TypeAdapter(list[ResponseItem])
    items.validate_json(json.dumps(listed.json()["data"]), strict=True)
    listed_types = [item["type"] for item in listed.json()["data"]][::-1]
    assert listed_types == [
        "message", "message", "reasoning", "function_call", "function_call_output",
    ]
    messages = model.requests[2]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == "weather"
    assert messages[4]["content"] == "It is 21 degrees in Berlin."


def test_item_references_are_tenant_scoped(tmp_path):
    keys = ("sk-tenant-a-1234567890", "sk-tenant-b-1234567890")
    with running_gateway(tmp_path, ScriptedModel(), api_keys=",".join(keys)) as gw:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=keys[0], max_retries=0) as client:
            first = client.responses.create(model="scripted-model", input="hi")
            reference = {"type": "item_reference", "id": first.output[0].id}
            own = client.responses.create(
                model="scripted-model", input=[reference, {"role": "user", "content": "again"}]
            )
        assert own.status == "completed"
        with gw.http() as http:
            other = http.post(
                "/v1/responses",
                json={"model": "scripted-model", "input": [reference]},
                headers={"Authorization": f"Bearer {keys[1]}"},
            )
    assert other.status_code == 400
    assert other.json()["error"]["param"] == "input[0].id"


def test_left_out_tools_recorded_on_the_step_and_mapped_types_run(tmp_path):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from gateway.testing.serving import serve_app

    async def search(request: Request) -> JSONResponse:
        return JSONResponse({"results": ["stepchain docs"]})

    call = {"id": "call_s", "name": "site_search", "arguments": '{"query": "stepchain"}'}
    model = ScriptedModel([Reply(tool_calls=[call]), "Found it.", "You're welcome.", "No tools."])
    with serve_app(Starlette(routes=[Route("/s", search, methods=["POST"])])) as url:
        tool = {
            "name": "site_search", "description": "Search the web", "url": f"{url}/s",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        }
        with running_gateway(
            tmp_path, model, tools=(tool,), hosted_tool_map={"web_search": "site_search"}
        ) as gw:
            tools = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
            mapped = check_all(gw, {"model": "scripted-model", "input": "search", "tools": tools})
            mcp_item, answer = mapped[-1]["response"]["output"]
            client = gw.client()
            again = client.responses.create(
                model="scripted-model",
                input=[
                    {"type": "item_reference", "id": mcp_item["id"]},
                    {"type": "item_reference", "id": answer["id"]},
                    {"role": "user", "content": "thanks"},
                ],
            )
            plain = client.responses.create(
                model="scripted-model", input="hi", tools=[{"type": "code_interpreter",
                                                           "container": {"type": "auto"}}],
            )
            with gw.http() as http:
                steps = http.get(f"/v1/responses/{plain.id}/steps").json()["data"]
            client.close()
    assert [i["type"] for i in mapped[-1]["response"]["output"]] == ["mcp_call", "message"]
    assert [t["function"]["name"] for t in model.requests[0]["tools"]] == ["site_search"]
    assert again.status == "completed"
    assert [m["role"] for m in model.requests[2]["messages"]] == ["assistant", "tool", "assistant", "user"]
    assert json.loads(model.requests[2]["messages"][1]["content"]) == {"results": ["stepchain docs"]}
    assert [t["function"]["name"] for t in model.requests[3]["tools"]] == ["site_search"]
    assert steps[0]["request_payload"]["stepchain"] == {"left_out_tools": ["code_interpreter"]}
    assert "stepchain" not in model.requests[3]
    assert plain.metadata == {}


def test_openai_sdk_stream_accumulates_custom_and_namespaced_calls(tmp_path):
    calls = [
        {"id": "call_c", "name": "apply_patch", "arguments": json.dumps({"input": PATCH})},
        {"id": "call_n", "name": "ns__read", "arguments": '{"path": "a"}'},
    ]
    model = ScriptedModel([Reply(reasoning="r", content="c", tool_calls=calls)])
    tools = [
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "ns", "description": "Files",
         "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}]},
    ]
    with running_gateway(tmp_path, model) as gw, gw.client() as client:
        with client.responses.stream(model="scripted-model", input="x", tools=tools) as stream:
            for _event in stream:
                pass
            final = stream.get_final_response()
    reasoning, message, custom, function = final.output
    assert (custom.type, custom.name, custom.input) == ("custom_tool_call", "apply_patch", PATCH)
    assert (function.type, function.name, function.namespace) == ("function_call", "read", "ns")
    assert message.phase == "commentary"
