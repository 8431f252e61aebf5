"""Every object and event a real gateway emits, validated against the Open Responses schema
(``tests/fixtures/openresponses/openapi.json``) and the openai SDK's models in strict mode.

Each scenario drives a real gateway (uvicorn on loopback) with the scripted upstream: text,
refusals, reasoning (``reasoning_content`` and ``reasoning`` deltas, with and without
``encrypted_content``), client function, namespaced and custom tool calls, a hosted tool loop
(``mcp_call`` items), a failed and an incomplete response. Every SSE event is checked, then the
final object of ``POST`` (not streamed), of ``GET`` and of the stream's terminal event.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from gateway.testing.serving import serve_app
from tests.gateway.harness import running_gateway

from .conformance import check_event, check_response

# Every gateway here runs once on SQLite, once on PostgreSQL.
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
KEY = "x4Kc9Ue6fWJ2lq1ZbVtH0x0p3cM2b1kq8QH0pZ3kXnA="  # a Fernet key for the test gateways
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files with a patch.",
    "format": {
        "type": "grammar",
        "syntax": "lark",
        "definition": 'start: "*** Begin Patch" LF body "*** End Patch"\nbody: /(.|\\n)*/\nLF: "\\n"',
    },
}
NAMESPACE = {
    "type": "namespace",
    "name": "mcp__files",
    "description": "Files on the user's machine.",
    "tools": [
        {
            "type": "function",
            "name": "read",
            "description": "Read a file.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
            "strict": False,
        }
    ],
}
PATCH = "*** Begin Patch\n*** Add File: a.txt\n+hello\n*** End Patch"


def sse_events(http: Any, body: dict[str, Any], url: str | None = None) -> list[bytes]:
    """POST a streamed request (or GET ``url``); the raw ``data`` JSON of every event."""
    datas = []
    if url is None:
        request = http.stream("POST", "/v1/responses", json={**body, "stream": True})
    else:
        request = http.stream("GET", url)
    with request as reply:
        assert reply.status_code == 200, reply.read()
        buffer = b""
        for chunk in reply.iter_bytes():
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                lines = frame.split(b"\n")
                if lines[0] == b"data: [DONE]" or lines[0].startswith(b":"):
                    continue
                kind = lines[0].removeprefix(b"event: ")
                data = lines[1].removeprefix(b"data: ")
                assert json.loads(data)["type"] == kind.decode()
                datas.append(data)
    return datas


def check_all(gw: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream ``body`` and check every event, the terminal response and its GET; return the
    events as dicts."""
    with gw.http() as http:
        raw = sse_events(http, body)
        events = [json.loads(data) for data in raw]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        for data in raw:
            check_event(data)
        final = events[-1]["response"]
        if final["store"]:
            got = http.get(f"/v1/responses/{final['id']}")
            assert got.status_code == 200
            check_response(got.content)
            # A replay from the store: the same events, each valid too.
            replayed = sse_events(http, {}, url=f"/v1/responses/{final['id']}?stream=true")
            for data in replayed:
                check_event(data)
            assert [json.loads(d)["type"] for d in replayed] == [e["type"] for e in events]
        check_response(json.dumps(final))
    return events


def check_plain(gw: Any, body: dict[str, Any]) -> dict[str, Any]:
    with gw.http() as http:
        reply = http.post("/v1/responses", json=body)
        assert reply.status_code == 200, reply.text
        check_response(reply.content)
        return reply.json()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_text_refusal_and_defaults(tmp_path):
    model = ScriptedModel([Reply(content="Hello there"), Reply(refusal="I can't."), "Again"])
    with running_gateway(tmp_path, model) as gw:
        events = check_all(gw, {"model": MODEL, "input": "hi"})
        assert "response.output_text.delta" in types(events)
        events = check_all(gw, {"model": MODEL, "input": "no", "temperature": 0.2})
        assert "response.refusal.done" in types(events)
        obj = check_plain(gw, {"model": MODEL, "input": "x", "instructions": "Be brief."})
    assert (obj["temperature"], obj["top_p"], obj["service_tier"]) == (1.0, 1.0, "default")
    assert obj["text"] == {"format": {"type": "text"}, "verbosity": "medium"}
    assert obj["output"][0]["phase"] == "final_answer"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_items(tmp_path, field):
    model = ScriptedModel(
        [Reply(reasoning="Think: 2+2=4.", reasoning_field=field, content="4")] * 2
    )
    with running_gateway(tmp_path, model, encrypted_content_key=KEY) as gw:
        events = check_all(gw, {"model": MODEL, "input": "2+2?", "reasoning": {"effort": "low"}})
        (item,) = [e["item"] for e in events if e["type"] == "response.output_item.done"][:1]
        assert item["type"] == "reasoning"
        assert item["content"] == [{"type": "reasoning_text", "text": "Think: 2+2=4."}]
        assert "encrypted_content" not in item
        body = {
            "model": MODEL, "input": "2+2?", "store": False,
            "include": ["reasoning.encrypted_content"],
        }
        events = check_all(gw, body)
    item = events[-1]["response"]["output"][0]
    assert item["type"] == "reasoning" and isinstance(item["encrypted_content"], str)
    assert "Think" not in item["encrypted_content"]


def test_client_tool_calls_function_namespace_custom(tmp_path):
    calls = [
        {"id": "call_f", "name": "lookup", "arguments": '{"q": "x"}'},
        {"id": "call_n", "name": "mcp__files__read", "arguments": '{"path": "a.txt"}'},
        {"id": "call_c", "name": "apply_patch", "arguments": json.dumps({"input": PATCH})},
    ]
    model = ScriptedModel(
        [
            Reply(content="Let me look.", tool_calls=calls),
            "done",
            Reply(reasoning="Hmm.", content="Again.", tool_calls=calls),
        ]
    )
    tools = [
        {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
        NAMESPACE,
        APPLY_PATCH,
        {"type": "web_search"},
    ]
    with running_gateway(tmp_path, model) as gw:
        events = check_all(gw, {"model": MODEL, "input": "go", "tools": tools})
        output = events[-1]["response"]["output"]
        message, function, namespaced, custom = output
        assert message["phase"] == "commentary"
        assert (function["type"], function["name"]) == ("function_call", "lookup")
        assert (namespaced["name"], namespaced["namespace"]) == ("read", "mcp__files")
        assert custom["type"] == "custom_tool_call" and custom["input"] == PATCH
        assert "response.custom_tool_call_input.done" in types(events)
        deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
        assert len(deltas) > 1 and "".join(deltas) == PATCH  # streamed as the upstream sent it
        follow = {
            "model": MODEL,
            "previous_response_id": events[-1]["response"]["id"],
            "tools": tools,
            "input": [
                {"type": "function_call_output", "call_id": "call_f", "output": "1"},
                {"type": "function_call_output", "call_id": "call_n", "output": "2"},
                {"type": "custom_tool_call_output", "call_id": "call_c", "output": "Done!"},
            ],
        }
        events = check_all(gw, follow)
        plain = check_plain(gw, {"model": MODEL, "input": "again", "tools": tools})
    assert [i["type"] for i in plain["output"]] == [
        "reasoning", "message", "function_call", "function_call", "custom_tool_call",
    ]
    assert events[-1]["response"]["status"] == "completed"
    sent = model.requests[1]
    assert [t["function"]["name"] for t in sent["tools"]] == [
        "lookup", "mcp__files__read", "apply_patch",
    ]
    assistant = sent["messages"][-4]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == [
        "lookup", "mcp__files__read", "apply_patch",
    ]
    assert json.loads(assistant["tool_calls"][2]["function"]["arguments"]) == {"input": PATCH}
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_c", "content": "Done!"}


def test_hosted_tool_loop_mcp_call_items(tmp_path):
    async def weather(request: Request) -> JSONResponse:
        return JSONResponse({"celsius": 21})

    calls = [{"id": "call_w", "name": "get_weather", "arguments": '{"city": "Lima"}'}]
    model = ScriptedModel([Reply(tool_calls=calls), Reply(tool_calls=calls), "Warm."])
    with serve_app(Starlette(routes=[Route("/w", weather, methods=["POST"])])) as tool_url:
        tool = {
            "name": "get_weather", "description": "Weather", "url": f"{tool_url}/w",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "attach": "always",
        }
        with running_gateway(tmp_path, model, tools=(tool,)) as gw:
            events = check_all(gw, {"model": MODEL, "input": "weather in Lima"})
    assert "response.mcp_call.completed" in types(events)
    assert [i["type"] for i in events[-1]["response"]["output"]] == [
        "mcp_call", "mcp_call", "message",
    ]


def test_background_stream(tmp_path):
    with running_gateway(tmp_path, ScriptedModel(["Later."])) as gw:
        events = check_all(gw, {"model": MODEL, "input": "bg", "background": True})
    assert events[-1]["response"]["background"] is True
    assert events[-1]["type"] == "response.completed"


def test_failed_and_incomplete(tmp_path):
    model = ScriptedModel(
        [
            Reply(content="a partial answer", chunk_size=2, drop_after_chunks=3),
            Reply(content="cut sh", finish_reason="length"),
        ]
    )
    with running_gateway(tmp_path, model, upstream_max_retries=0) as gw:
        events = check_all(gw, {"model": MODEL, "input": "fail"})
        assert events[-1]["type"] == "response.failed"
        events = check_all(gw, {"model": MODEL, "input": "cut", "max_output_tokens": 3})
        assert events[-1]["type"] == "response.incomplete"


def test_the_checks_reject_what_clients_reject():
    from gateway.protocol.response_object import response_object

    good = response_object(
        id="resp_1", created_at=1, model="m", request={}, status="completed", output=[], usage=None
    )
    check_response(good)
    for key, value in (("temperature", None), ("top_p", None), ("text", None), ("tools", None)):
        with pytest.raises(Exception):
            check_response({**good, key: value})
    with pytest.raises(Exception):
        check_event({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m",
                     "output_index": 0, "content_index": "0", "delta": "x", "logprobs": []})
