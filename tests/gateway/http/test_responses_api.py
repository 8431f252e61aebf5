"""The Responses API end to end: the real openai SDK against a running gateway on loopback."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from tests.gateway.harness import gateway_on, running_gateway

# SDK round trips, streaming, tools and resilience on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"


@pytest.fixture
def gw(tmp_path):
    with running_gateway(tmp_path) as running:
        yield running


def test_text_answer(gw):
    gw.model.replies.append(Reply(content="Hello there!"))
    response = gw.client().responses.create(model=MODEL, input="Say hello")
    assert response.status == "completed"
    assert response.output_text == "Hello there!"
    assert response.id.startswith("resp_")
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    sent = gw.model.requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "Say hello"}]
    assert sent["model"] == MODEL


def test_instructions_become_the_first_system_message(gw):
    gw.model.replies.append(Reply(content="Arr."))
    response = gw.client().responses.create(
        model=MODEL, instructions="Talk like a pirate.", input="Hi", temperature=0.2, max_output_tokens=50
    )
    assert response.output_text == "Arr."
    assert response.instructions == "Talk like a pirate."
    sent = gw.model.requests[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Talk like a pirate."}
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 50


def test_image_input_reaches_the_upstream_as_an_image_part(gw):
    gw.model.replies.append(Reply(content="A red pixel."))
    data_url = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    response = gw.client().responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": data_url, "detail": "low"},
                ],
            }
        ],
    )
    assert response.output_text == "A red pixel."
    parts = gw.model.requests[-1]["messages"][0]["content"]
    assert {"type": "image_url", "image_url": {"url": data_url, "detail": "low"}} in parts


def test_json_schema_output_maps_to_response_format(gw):
    gw.model.replies.append(Reply(content='{"answer": 42}'))
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    response = gw.client().responses.create(
        model=MODEL,
        input="The answer?",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert response.output_text == '{"answer": 42}'
    assert gw.model.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def test_streaming_events_and_final_response(gw):
    gw.model.replies.append(Reply(content="Streaming works fine.", chunk_size=3))
    client = gw.client()
    events = list(client.responses.create(model=MODEL, input="stream", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "Streaming works fine."
    assert types.index("response.content_part.added") < types.index("response.output_text.delta")
    final = events[-1].response
    assert final.output_text == "Streaming works fine."
    assert final.usage is not None and final.usage.output_tokens > 0
    # Stored before response.completed was sent: a GET right away returns the same response.
    again = client.responses.retrieve(final.id)
    assert again.model_dump() == final.model_dump()
    assert gw.model.requests[-1]["stream"] is True
    assert gw.model.requests[-1]["stream_options"] == {"include_usage": True}


def test_stream_helper_get_final_response(gw):
    gw.model.replies.append(Reply(content="Helper text.", reasoning="Thinking it over."))
    with gw.client().responses.stream(model=MODEL, input="hi") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == "Helper text." == final.output_text
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Thinking it over."


def test_client_function_tool_round_trip(gw):
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    gw.model.replies.append(
        Reply(tool_calls=[{"id": "call_123", "name": "get_weather", "arguments": '{"city": "Oslo"}'}])
    )
    client = gw.client()
    first = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[tool])
    assert first.status == "completed"
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.call_id, call.name, call.arguments) == ("call_123", "get_weather", '{"city": "Oslo"}')
    assert gw.model.requests[-1]["tools"][0]["function"]["name"] == "get_weather"

    gw.model.replies.append(Reply(content="It is 5 degrees in Oslo."))
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": "call_123", "output": '{"temp": 5}'}],
        tools=[tool],
    )
    assert second.output_text == "It is 5 degrees in Oslo."
    messages = gw.model.requests[-1]["messages"]
    assert messages[0] == {"role": "user", "content": "Weather in Oslo?"}
    assert messages[1]["role"] == "assistant"
    assert messages[1]["tool_calls"][0]["id"] == "call_123"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_123", "content": '{"temp": 5}'}


def test_three_turn_conversation_without_carrying_instructions(gw):
    client = gw.client()
    previous = None
    for turn, answer in enumerate(["One.", "Two.", "Three."]):
        gw.model.replies.append(Reply(content=answer))
        response = client.responses.create(
            model=MODEL,
            input=f"turn {turn}",
            instructions=f"instructions {turn}",
            previous_response_id=previous,
        )
        previous = response.id
    messages = gw.model.requests[-1]["messages"]
    assert messages == [
        {"role": "system", "content": "instructions 2"},
        {"role": "user", "content": "turn 0"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "turn 1"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "turn 2"},
    ]


def test_previous_response_survives_a_restart(tmp_path):
    model = ScriptedModel()
    model.replies.append(Reply(content="Remembered."))
    with running_gateway(tmp_path, model) as gw:
        first = gw.client().responses.create(model=MODEL, input="remember me")
        upstream = f"{gw.upstream_url}/v1"
        # A second gateway process-equivalent on the same database, fresh caches.
        with gateway_on(gw.db, upstream) as (url, _):
            with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
                model.replies.append(Reply(content="Yes."))
                second = client.responses.create(model=MODEL, input="again", previous_response_id=first.id)
                assert second.output_text == "Yes."
    assert model.requests[-1]["messages"][:2] == [
        {"role": "user", "content": "remember me"},
        {"role": "assistant", "content": "Remembered."},
    ]


def test_unknown_previous_response_is_a_400(gw):
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().responses.create(model=MODEL, input="x", previous_response_id="resp_nope")
    body = info.value.body
    assert body["code"] == "previous_response_not_found"
    assert body["param"] == "previous_response_id"


def test_retrieve_delete_and_input_items_paging(gw):
    client = gw.client()
    gw.model.replies.append(Reply(content="ok"))
    items = [{"role": "user", "content": f"message {i}"} for i in range(5)]
    response = client.responses.create(model=MODEL, input=items)
    assert client.responses.retrieve(response.id).output_text == "ok"

    page = client.responses.input_items.list(response.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["message 0", "message 1"]
    assert page.has_more
    everything = list(client.responses.input_items.list(response.id, limit=2, order="asc"))
    assert [i.content[0].text for i in everything] == [f"message {i}" for i in range(5)]
    newest = client.responses.input_items.list(response.id)
    assert newest.data[0].content[0].text == "message 4" and not newest.has_more

    deleted = client.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_store_false_is_not_retrievable(gw):
    gw.model.replies.append(Reply(content="ephemeral"))
    client = gw.client()
    response = client.responses.create(model=MODEL, input="x", store=False)
    assert response.output_text == "ephemeral"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_chat_completions_passthrough_streaming_and_not(gw):
    client = gw.client()
    gw.model.replies.append(Reply(content="plain answer"))
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "plain answer"
    gw.model.replies.append(Reply(content="streamed answer", chunk_size=4))
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed answer" and len(chunks) > 2
    models = client.models.list()
    assert any(m.id == MODEL for m in models.data)


def test_errors_are_openai_shaped(gw):
    with gw.http() as http:
        bad_json = http.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400
        assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
        wrong_type = http.post("/v1/responses", json={"model": MODEL, "input": 5})
        assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "input"
        missing = http.get("/v1/responses/resp_missing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
        no_route = http.get("/v1/nothing-here")
        assert no_route.status_code == 404 and "error" in no_route.json()


def test_unknown_fields_are_ignored(gw):
    gw.model.replies.append(Reply(content="fine"))
    with gw.http() as http:
        reply = http.post(
            "/v1/responses",
            json={"model": MODEL, "input": "x", "some_future_field": {"a": 1}, "include": []},
        )
    assert reply.status_code == 200 and reply.json()["status"] == "completed"


def test_upstream_failure_before_streaming_is_an_http_error(tmp_path):
    with running_gateway(tmp_path, upstream_max_retries=0) as gw:
        gw.model.replies.append(Reply(status=500))
        client = gw.client()
        with pytest.raises(openai.APIStatusError) as info:
            list(client.responses.create(model=MODEL, input="x", stream=True))
        assert info.value.status_code == 502
        with gw.http() as http:
            assert http.get("/healthz").json() == {"status": "ok"}


def test_deltas_arrive_while_the_upstream_is_still_streaming(gw):
    """The first delta reaches the client before the upstream has sent its last chunk."""
    gw.model.replies.append(Reply(content="a" * 40, chunk_size=2, chunk_delay_s=0.05))
    seen_before_end = None
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "x", "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("event: response.output_text.delta") and seen_before_end is None:
                    # The upstream still has most of its 20 chunks (50 ms apart) to send.
                    seen_before_end = gw.model.streams_finished
    assert seen_before_end == 0
