"""History rebuilt for ``previous_response_id``: the configured tool-output limits apply to it,
and a deleted response's items are never sent upstream again."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from gateway.testing.serving import serve_app
from tests.gateway.harness import running_gateway

# Every gateway here runs once on SQLite, once on PostgreSQL.
pytestmark = pytest.mark.usefixtures("on_both_backends")

LONG_OUTPUT = "\n".join(f"line {i} of the tool's long answer" for i in range(400))


async def _long(request: Request) -> PlainTextResponse:
    return PlainTextResponse(LONG_OUTPUT)


def _tool_messages(body: dict) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


def _script(body: dict) -> Reply:
    last = body["messages"][-1]
    if last["role"] == "user" and "use the tool" in str(last["content"]):
        return Reply(tool_calls=[{"id": "call_1", "name": "long_answer", "arguments": "{}"}])
    return Reply(content="done")


def test_tool_output_limits_apply_to_rebuilt_history(tmp_path):
    model = ScriptedModel(default=_script)
    with serve_app(Starlette(routes=[Route("/long", _long, methods=["POST"])])) as tool_url:
        tool = {"name": "long_answer", "url": f"{tool_url}/long"}
        with running_gateway(
            tmp_path, model, tools=(tool,), tool_output_max_bytes=300, tool_output_max_lines=5
        ) as gw, gw.client() as client:
            first = client.responses.create(model="m", input="please use the tool")
            assert first.output_text == "done"
            live = _tool_messages(model.requests[-1])  # the loop's own follow-up call
            child = client.responses.create(model="m", input="and now?", previous_response_id=first.id)
            assert child.output_text == "done"
            rebuilt = _tool_messages(model.requests[-1])  # the child's history, from the store
    assert len(live) == len(rebuilt) == 1
    assert "[output truncated" in rebuilt[0] and LONG_OUTPUT not in rebuilt[0]
    assert rebuilt == live  # the same text the model saw when the tool ran
    assert rebuilt[0].count("\n") <= 6


def test_deleted_response_items_never_go_upstream_again(tmp_path):
    model = ScriptedModel(default=lambda body: Reply(content="ok"))
    with running_gateway(tmp_path, model) as gw, gw.client() as client, gw.http() as http:
        parent = client.responses.create(model="m", input="the parent's words: parsnip")
        child = client.responses.create(model="m", input="the child's words", previous_response_id=parent.id)
        assert "parsnip" in str(model.requests[-1]["messages"])  # cached history had it
        deleted = http.delete(f"/v1/responses/{parent.id}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True

        grandchild = client.responses.create(model="m", input="more", previous_response_id=child.id)
        assert grandchild.status == "completed"
        sent = str(model.requests[-1]["messages"])
        assert "parsnip" not in sent and "the child's words" in sent

        orphan = http.post("/v1/responses", json={"model": "m", "input": "x", "previous_response_id": parent.id})
    assert orphan.status_code == 400
    assert orphan.json()["error"]["code"] == "previous_response_not_found"
