"""``POST /v1/responses/compact`` and ``POST /v1/responses/input_tokens`` with the real openai SDK
against a running gateway and a scripted upstream."""

from __future__ import annotations

import openai
import pytest

from gateway.engine.compaction import SUMMARY_PREFIX, SUMMARY_PROMPT
from gateway.engine.tokens import estimate_tokens
from gateway.testing.scripted_upstream import Reply, tokenize_count
from tests.gateway.harness import running_gateway

# Run on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
SUMMARY = "- The user is Ada; she wants a haiku about tea.\n- Draft 1 was too long."


@pytest.fixture
def gw(tmp_path):
    with running_gateway(tmp_path, upstream_max_retries=0) as running:
        yield running


def test_compact_summarizes_with_the_upstream_and_the_item_expands_on_the_next_request(gw):
    client = gw.client()
    gw.model.replies.append(Reply(content="A long first draft about tea."))
    first = client.responses.create(model=MODEL, input="I am Ada. Write a haiku about tea.")
    gw.model.replies.append(Reply(content=SUMMARY))
    raw = client.responses.with_raw_response.compact(
        model=MODEL, previous_response_id=first.id, input="Shorter, please."
    )
    compacted = raw.parse()
    # The output as sent (user messages keep their input_text parts), for sending back.
    output = raw.http_response.json()["output"]
    assert compacted.object == "response.compaction"
    assert compacted.id.startswith("cmp_")
    *users, item = compacted.output
    assert [u["content"][0] for u in output[:-1]] == [
        {"type": "input_text", "text": "I am Ada. Write a haiku about tea."},
        {"type": "input_text", "text": "Shorter, please."},
    ]
    assert all(u["role"] == "user" and u["type"] == "message" for u in output[:-1])
    assert len(users) == 2
    assert item.type == "compaction" and item.id.startswith("cmp_")
    assert "Ada" not in item.encrypted_content  # sealed, not readable by the client
    assert compacted.usage.total_tokens > 0
    sent = gw.model.requests[-1]
    assert sent["stream"] is False
    assert sent["messages"][-1] == {"role": "user", "content": SUMMARY_PROMPT}
    assert [m["content"] for m in sent["messages"][:-1]] == [
        "I am Ada. Write a haiku about tea.", "A long first draft about tea.", "Shorter, please."
    ]

    gw.model.replies.append(Reply(content="Steam curls from the cup"))
    follow = client.responses.create(
        model=MODEL,
        input=[*output, {"role": "user", "content": "Go on."}],
    )
    assert follow.output_text == "Steam curls from the cup"
    messages = gw.model.requests[-1]["messages"]
    assert {"role": "user", "content": SUMMARY_PREFIX + SUMMARY} in messages
    assert all("long first draft" not in str(m["content"]) for m in messages)
    # The compaction item is kept as sent in the stored input.
    listed = client.responses.input_items.list(follow.id, order="asc")
    assert [i.type for i in listed.data][-2:] == ["compaction", "message"]

    # A compaction item compacts again: its summary is part of what is summarized.
    gw.model.replies.append(Reply(content="shorter summary"))
    again = client.responses.compact(model=MODEL, input=output)
    assert again.output[-1].type == "compaction"
    assert {"role": "user", "content": SUMMARY_PREFIX + SUMMARY} in gw.model.requests[-1]["messages"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        pytest.param({"input": "hi"}, "model", None, id="no-model"),
        pytest.param({"model": "", "input": "hi"}, "model", None, id="empty-model"),
        pytest.param({"model": MODEL, "input": 5}, "input", None, id="bad-input"),
        pytest.param({"model": MODEL, "input": [{"type": "compaction", "encrypted_content": "x"}]},
                     "input", "invalid_encrypted_content", id="foreign-compaction"),
        pytest.param({"model": MODEL, "previous_response_id": "resp_unknown"},
                     "previous_response_id", "previous_response_not_found", id="unknown-previous"),
    ],
)
def test_invalid_compact_requests_are_400_and_never_reach_the_upstream(gw, body, param, code):
    with gw.http() as http:
        answer = http.post("/v1/responses/compact", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert gw.model.requests == []


def test_a_tampered_compaction_item_is_refused(gw):
    client = gw.client()
    gw.model.replies.append(Reply(content=SUMMARY))
    compacted = client.responses.compact(model=MODEL, input="Remember: blue.")
    item = compacted.output[-1].model_dump()
    token = item["encrypted_content"]
    item["encrypted_content"] = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    calls = len(gw.model.requests)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=[item])
    assert info.value.body["code"] == "invalid_encrypted_content"
    assert len(gw.model.requests) == calls


def test_input_tokens_uses_the_upstream_tokenizer_when_it_has_one(gw):
    gw.model.tokenize = True
    client = gw.client()
    first = client.responses.create(model=MODEL, input="one two three")
    counted = client.responses.input_tokens.count(
        model=MODEL, instructions="Be brief.", previous_response_id=first.id, input="four five"
    )
    assert counted.object == "response.input_tokens"
    (asked,) = gw.model.tokenize_requests
    assert [m["content"] for m in asked["messages"]] == [
        "Be brief.", "one two three", "Echo: one two three", "four five"
    ]
    assert counted.input_tokens == tokenize_count(asked)


def test_input_tokens_falls_back_to_the_estimate_and_remembers_there_is_no_tokenizer(gw):
    client = gw.client()
    counted = client.responses.input_tokens.count(model=MODEL, input="How many tokens is this?")
    expected = estimate_tokens({"messages": [{"role": "user", "content": "How many tokens is this?"}]})
    assert counted.input_tokens == expected
    gw.model.tokenize = True  # not asked again: the first probe found none
    again = client.responses.input_tokens.count(input="How many tokens is this?")
    assert again.input_tokens == expected
    assert gw.model.tokenize_requests == []
    assert gw.model.requests == []  # counting never runs the model


def test_input_tokens_validates_like_create(gw):
    with gw.http() as http:
        answer = http.post("/v1/responses/input_tokens", json={"input": 5})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "input"
        answer = http.post(
            "/v1/responses/input_tokens", json={"input": "x", "previous_response_id": "resp_nope"}
        )
        assert answer.json()["error"]["code"] == "previous_response_not_found"
