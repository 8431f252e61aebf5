"""The Conversations API and ``responses.create(conversation=…)`` with the real openai SDK (and
openai-agents) against a running gateway, on a real SQLite file and on PostgreSQL (every test runs
on both backends)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway

MODEL = "scripted-model"
pytestmark = pytest.mark.usefixtures("on_both_backends")


@pytest.fixture
def gw(tmp_path):
    with running_gateway(tmp_path, upstream_max_retries=0) as running:
        yield running


def texts(items) -> list[str]:
    return [part.text for item in items for part in item.content]


def test_conversation_and_item_crud(gw):
    client = gw.client()
    conversation = client.conversations.create(
        items=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}],
        metadata={"topic": "greeting"},
    )
    assert conversation.object == "conversation" and conversation.id.startswith("conv_")
    assert conversation.metadata == {"topic": "greeting"}
    assert client.conversations.retrieve(conversation.id).created_at == conversation.created_at
    updated = client.conversations.update(conversation.id, metadata={"topic": "tea"})
    assert updated.metadata == {"topic": "tea"}

    added = client.conversations.items.create(
        conversation.id,
        items=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"m{i}"}]}
               for i in range(3)],
    )
    assert [i.content[0].text for i in added.data] == ["m0", "m1", "m2"]
    assert added.first_id == added.data[0].id and added.has_more is False

    newest = client.conversations.items.list(conversation.id, limit=2)
    assert texts(newest.data) == ["m2", "m1"] and newest.has_more
    rest = client.conversations.items.list(conversation.id, limit=10, after=newest.last_id)
    assert texts(rest.data) == ["m0", "Hi!", "Hello"] and not rest.has_more
    oldest = client.conversations.items.list(conversation.id, order="asc")
    assert texts(oldest.data) == ["Hello", "Hi!", "m0", "m1", "m2"]
    # The SDK's auto-paging iterator walks every page.
    assert len(list(client.conversations.items.list(conversation.id, limit=1))) == 5

    item = client.conversations.items.retrieve(added.data[1].id, conversation_id=conversation.id)
    assert item.id == added.data[1].id and item.content[0].text == "m1"
    after_delete = client.conversations.items.delete(added.data[1].id, conversation_id=conversation.id)
    assert after_delete.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(added.data[1].id, conversation_id=conversation.id)

    deleted = client.conversations.delete(conversation.id)
    assert deleted.deleted is True and deleted.object == "conversation.deleted"
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(conversation.id)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        pytest.param("/v1/conversations", {"metadata": {"k": 5}}, "metadata.k", id="metadata-value"),
        pytest.param("/v1/conversations", {"items": "x"}, "items", id="items-not-a-list"),
        pytest.param("/v1/conversations", {"items": [{"role": "robot", "content": "x"}]},
                     "items[0].role", id="bad-item"),
        pytest.param("/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21},
                     "items", id="too-many-items"),
        pytest.param("/v1/conversations",
                     {"items": [{"id": "msg_1", "role": "user", "content": "x"}] * 2},
                     "items", id="repeated-ids"),
        # PostgreSQL text cannot hold NUL: an id holding one is refused on both backends.
        pytest.param("/v1/conversations", {"items": [{"id": "msg_\x00", "role": "user", "content": "x"}]},
                     "items[0].id", id="nul-in-id"),
    ],
)
def test_bad_conversation_requests_are_400(gw, path, body, param):
    with gw.http() as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def test_item_listing_checks_its_query(gw):
    conversation = gw.client().conversations.create()
    with gw.http() as http:
        base = f"/v1/conversations/{conversation.id}/items"
        assert http.get(base, params={"limit": 0}).json()["error"]["param"] == "limit"
        assert http.get(base, params={"order": "up"}).json()["error"]["param"] == "order"
        assert http.get(base, params={"after": "msg_nope"}).json()["error"]["param"] == "after"
        assert http.get(base, params={"after": "msg_\x00"}).json()["error"]["param"] == "after"
        assert http.get("/v1/conversations/conv_%00/items").status_code == 404
        assert http.get(f"{base}/msg_%00").status_code == 404
        empty = http.get(base).json()
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_responses_in_a_conversation_share_its_history_and_append_to_it(gw):
    client = gw.client()
    conversation = client.conversations.create(items=[{"role": "user", "content": "My name is Ada."}])
    first = client.responses.create(model=MODEL, input="What is my name?", conversation=conversation.id)
    assert first.output_text == "Echo: What is my name?"
    assert first.conversation.id == conversation.id
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == [
        "My name is Ada.", "What is my name?"
    ]
    second = client.responses.create(
        model=MODEL, input="And again?", conversation={"id": conversation.id}
    )
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == [
        "My name is Ada.", "What is my name?", "Echo: What is my name?", "And again?"
    ]
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == [
        ("user", "My name is Ada."),
        ("user", "What is my name?"),
        ("assistant", "Echo: What is my name?"),
        ("user", "And again?"),
        ("assistant", "Echo: And again?"),
    ]
    # The conversation's assistant items are the responses' own output items.
    assert items[2].id == first.output[0].id and items[4].id == second.output[0].id


def test_streamed_responses_and_client_tools_in_a_conversation(gw):
    client = gw.client()
    conversation = client.conversations.create()
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    gw.model.replies.append(Reply(tool_calls=[{"id": "call_1", "name": "lookup", "arguments": "{}"}]))
    with client.responses.stream(
        model=MODEL, input="Look it up", tools=[tool], conversation=conversation.id
    ) as stream:
        called = stream.get_final_response()
    (call,) = [i for i in called.output if i.type == "function_call"]
    gw.model.replies.append(Reply(content="Found it"))
    answer = client.responses.create(
        model=MODEL, tools=[tool], conversation=conversation.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
    )
    assert answer.output_text == "Found it"
    assert gw.model.requests[-1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    kinds = [i.type for i in client.conversations.items.list(conversation.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output", "message"]


def test_a_failed_response_adds_nothing_to_its_conversation(gw):
    client = gw.client()
    conversation = client.conversations.create()
    gw.model.replies.append(Reply(status=500))
    with pytest.raises(openai.APIStatusError):
        client.responses.create(model=MODEL, input="x", conversation=conversation.id)
    assert client.conversations.items.list(conversation.id).data == []


def test_conversation_with_previous_response_id_is_400_and_unknown_ones_404(gw):
    client = gw.client()
    first = client.responses.create(model=MODEL, input="hi")
    conversation = client.conversations.create()
    calls = len(gw.model.requests)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=MODEL, input="x", conversation=conversation.id, previous_response_id=first.id
        )
    assert info.value.body["param"] == "conversation"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", conversation="conv_unknown")
    assert len(gw.model.requests) == calls


def test_conversations_are_tenant_scoped(tmp_path):
    with running_gateway(tmp_path, api_keys="key-a,key-b") as gw:
        a = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="key-a", max_retries=0)
        b = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="key-b", max_retries=0)
        gw.clients.callback(a.close)
        gw.clients.callback(b.close)
        conversation = a.conversations.create(items=[{"role": "user", "content": "secret"}])
        for attempt in (
            lambda: b.conversations.retrieve(conversation.id),
            lambda: b.conversations.items.list(conversation.id),
            lambda: b.conversations.delete(conversation.id),
            lambda: b.responses.create(model=MODEL, input="x", conversation=conversation.id),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert a.conversations.retrieve(conversation.id).id == conversation.id


def test_openai_agents_runner_with_a_conversation(gw):
    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)

    async def main() -> list[str]:
        client = AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="test", max_retries=0)
        agent = Agent(
            name="helper", instructions="Be brief.",
            model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        )
        conversation = await client.conversations.create()
        outputs = []
        for text in ("I like tea.", "What do I like?"):
            result = await Runner.run(agent, text, conversation_id=conversation.id)
            outputs.append(result.final_output)
        items = await client.conversations.items.list(conversation.id, order="asc")
        await client.close()
        return outputs + [i.content[0].text for i in items.data]

    outputs = asyncio.run(main())
    assert outputs[:2] == ["Echo: I like tea.", "Echo: What do I like?"]
    assert outputs[2:] == ["I like tea.", "Echo: I like tea.", "What do I like?", "Echo: What do I like?"]
    # The second run sent the first turn from the conversation, not from the client.
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == [
        "Be brief.", "I like tea.", "Echo: I like tea.", "What do I like?"
    ]


def test_input_tokens_and_websocket_mode_use_the_conversation(gw):
    client = gw.client()
    gw.model.tokenize = True
    conversation = client.conversations.create(items=[{"role": "user", "content": "one two"}])
    counted = client.responses.input_tokens.count(model=MODEL, input="three", conversation=conversation.id)
    assert [m["content"] for m in gw.model.tokenize_requests[-1]["messages"]] == ["one two", "three"]
    assert counted.input_tokens > 0
    with client.responses.connect() as connection:
        connection.response.create(model=MODEL, input="over the socket", conversation=conversation.id)
        for event in connection:
            if event.type in ("response.completed", "response.failed", "error"):
                break
    assert event.type == "response.completed"
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == ["one two", "over the socket"]
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [i.content[0].text for i in items] == ["one two", "over the socket", "Echo: over the socket"]


def test_conversation_items_page_through_a_turn(gw):
    """A conversation's atomic turn between items added by hand, paged in two requests."""
    with gw.client() as client:
        conversation = client.conversations.create(
            items=[{"role": "user", "content": "first"}], metadata={"backend": "any"}
        )
        client.responses.create(model=MODEL, input="second", conversation=conversation.id)
        client.conversations.items.create(
            conversation.id, items=[{"role": "user", "content": "third"}]
        )
        page = client.conversations.items.list(conversation.id, order="asc", limit=2)
        rest = client.conversations.items.list(
            conversation.id, order="asc", after=page.last_id
        )
        assert texts(page.data) + texts(rest.data) == ["first", "second", "Echo: second", "third"]
        assert page.has_more and not rest.has_more
        assert client.conversations.update(conversation.id, metadata={}).metadata == {}
        assert client.conversations.delete(conversation.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(conversation.id)
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == ["first", "second"]
