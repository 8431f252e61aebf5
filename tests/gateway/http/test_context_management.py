"""``context_management`` compaction and ``truncation: "auto"`` end to end: the real openai SDK,
a running gateway, and a scripted upstream that records what it was sent."""

from __future__ import annotations

import openai
import pytest

from gateway.protocol.context_window import SUMMARY_PREFIX, SUMMARY_PROMPT
from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway

# Run on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
LONG = "word " * 300  # about 375 estimated tokens


def test_auto_compaction_is_a_recorded_step_and_the_call_continues_from_the_summary(tmp_path):
    with running_gateway(tmp_path) as gw:
        client = gw.client()
        gw.model.replies.append(Reply(content=LONG))
        first = client.responses.create(model=MODEL, input="Tell me a long story.")
        gw.model.replies.append(Reply(content="A long story was told."))
        gw.model.replies.append(Reply(content="The end."))
        with client.responses.stream(
            model=MODEL, input="How does it end?", previous_response_id=first.id,
            context_management=[{"type": "compaction", "compact_threshold": 200}],
        ) as stream:
            events = list(stream)
            final = stream.get_final_response()
        summary_call, answer_call = gw.model.requests[-2:]
        with gw.http() as http:
            steps = http.get(f"/v1/responses/{final.id}/steps").json()["data"]
    assert summary_call["stream"] is False
    assert summary_call["messages"][-1] == {"role": "user", "content": SUMMARY_PROMPT}
    assert answer_call["messages"] == [
        {"role": "user", "content": SUMMARY_PREFIX + "A long story was told."},
        {"role": "user", "content": "How does it end?"},
    ]
    # The summary is no output: one message, streamed as usual; its tokens are counted.
    assert [item.type for item in final.output] == ["message"]
    assert final.output_text == "The end."
    assert [e.type for e in events].count("response.output_item.added") == 1
    assert [s["kind"] for s in steps] == ["model_call", "model_call"]
    assert steps[0]["request_payload"] == summary_call
    assert final.usage.input_tokens > sum(1 for _ in answer_call["messages"])


def test_below_the_threshold_nothing_is_compacted(tmp_path):
    with running_gateway(tmp_path) as gw:
        response = gw.client().responses.create(
            model=MODEL, input="short", context_management=[{"type": "compaction", "compact_threshold": 5000}]
        )
    assert response.output_text == "Echo: short"
    assert len(gw.model.requests) == 1


def test_truncation_auto_fits_the_configured_context_window(tmp_path):
    with running_gateway(tmp_path, model_context_windows={MODEL: 400}) as gw:
        client = gw.client()
        gw.model.replies.append(Reply(content=LONG))
        first = client.responses.create(model=MODEL, input="Story, please.")
        client.responses.create(
            model=MODEL, input="Shorter?", previous_response_id=first.id, truncation="auto"
        )
        assert [m["content"] for m in gw.model.requests[-1]["messages"]] == ["Shorter?"]
        client.responses.create(model=MODEL, input="Untruncated?", previous_response_id=first.id)
        assert len(gw.model.requests[-1]["messages"]) == 3


def test_an_upstream_context_length_error_is_retried_once_truncated(tmp_path):
    with running_gateway(tmp_path, upstream_max_retries=0) as gw:
        client = gw.client()
        gw.model.replies.append(Reply(content=LONG))
        first = client.responses.create(model=MODEL, input="Story, please.")
        gw.model.replies.append(Reply(status=400, error_code="context_length_exceeded"))
        retried = client.responses.create(
            model=MODEL, input="Again?", previous_response_id=first.id, truncation="auto"
        )
        assert retried.status == "completed" and retried.output_text == "Echo: Again?"
        refused, accepted = gw.model.requests[-2:]
        assert len(accepted["messages"]) < len(refused["messages"])
        assert accepted["messages"][-1] == {"role": "user", "content": "Again?"}
        # Without truncation: the upstream's refusal is the response's error.
        gw.model.replies.append(Reply(status=400, error_code="context_length_exceeded"))
        with pytest.raises(openai.APIStatusError):
            client.responses.create(model=MODEL, input="Again?", previous_response_id=first.id)


def test_bad_context_management_is_a_400(tmp_path):
    with running_gateway(tmp_path) as gw:
        client = gw.client()
        for value, param in (
            ([{"type": "summarize"}], "context_management[0].type"),
            ([{"type": "compaction", "compact_threshold": 0}], "context_management[0].compact_threshold"),
        ):
            with pytest.raises(openai.BadRequestError) as info:
                client.responses.create(model=MODEL, input="x", context_management=value)
            assert info.value.body["param"] == param
        assert gw.model.requests == []
