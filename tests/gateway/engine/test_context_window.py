"""Context management, pure: token estimates, truncation by whole units, and the transitions of
``context_management`` compaction and ``truncation: "auto"``."""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.transition import AppendSteps, Complete, Fail, LoopRequest, next_action
from gateway.protocol.context_window import (
    SUMMARY_PREFIX,
    SUMMARY_PROMPT,
    compacted_body,
    compaction_request,
    estimate_tokens,
    is_compaction_request,
    truncate_messages,
    units,
)
from store.types import MODEL_CALL, TOOL_CALL, Step

_ids = itertools.count()
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def tool_turn(call_id, output):
    call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": output},
    ]


def body(*messages, **extra):
    return {"model": "m", "messages": list(messages), "stream": True, **extra}


def step(request, *, content="ok", calls=(), state="completed", error=None, kind=MODEL_CALL):
    n = next(_ids)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": c, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            for c in calls
        ]
    completion = {"choices": [{"index": 0, "message": message,
                               "finish_reason": "tool_calls" if calls else "stop"}]}
    return Step(
        id=f"step_{n:04d}", response_id="resp_1", scope_parent=None, prev_step_id=None,
        sequence=n, kind=kind, state=state, request_payload=request,
        response_payload=completion if state == "completed" else None, error=error,
    )


def tool_step(call_id, output="42"):
    n = next(_ids)
    return Step(
        id=f"step_{n:04d}", response_id="resp_1", scope_parent=None, prev_step_id=None,
        sequence=n, kind=TOOL_CALL, state="completed",
        request_payload={"name": "lookup", "call_id": call_id, "arguments": "{}"},
        response_payload={"result": output},
    )


def test_estimate_counts_text_bytes_messages_and_tools():
    assert estimate_tokens(body(user("abcd"))) == 3 + 4 + 1
    assert estimate_tokens(body(user("é" * 4))) == 3 + 4 + 2  # 8 UTF-8 bytes
    with_tools = body(user("abcd"), tools=[{"type": "function", "function": {"name": "x"}}])
    assert estimate_tokens(with_tools) > estimate_tokens(body(user("abcd")))
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}
    assert estimate_tokens(body(image)) == 3 + 4 + 85


def test_units_keep_tool_calls_with_their_outputs():
    messages = [SYSTEM, user("a"), *tool_turn("c1", "x"), {"role": "assistant", "content": "b"}, user("c")]
    assert units(messages) == (1, [(1, 2), (2, 4), (4, 5), (5, 6)])


def test_truncation_drops_the_oldest_units_and_keeps_the_system_and_last_ones():
    messages = [SYSTEM, user("x" * 400), *tool_turn("c1", "y" * 400), user("last question")]
    full = body(*messages)
    cut = truncate_messages(full, estimate_tokens(full) - 50)
    assert cut["messages"] == [SYSTEM, *tool_turn("c1", "y" * 400), user("last question")]
    cut = truncate_messages(full, 1)
    assert cut["messages"] == [SYSTEM, user("last question")]
    assert truncate_messages(full, 10_000) is full


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["user", "tool_turn", "assistant"]), min_size=1, max_size=12),
       st.integers(min_value=1, max_value=400))
def test_truncation_never_leaves_a_tool_message_without_its_call(shape, budget):
    messages = [SYSTEM]
    for i, kind in enumerate(shape):
        if kind == "user":
            messages.append(user("u" * 40))
        elif kind == "assistant":
            messages.append({"role": "assistant", "content": "a" * 40})
        else:
            messages.extend(tool_turn(f"c{i}", "t" * 40))
    cut = truncate_messages(body(*messages), budget)["messages"]
    assert cut[0] == SYSTEM and cut[-1] == messages[-1]
    for i, message in enumerate(cut):
        if message["role"] == "tool":
            assert cut[i - 1]["role"] in ("assistant", "tool")
    # Only a prefix of units is dropped: what is kept is a suffix of the original.
    assert cut[1:] == messages[len(messages) - len(cut) + 1:]


def test_compaction_request_and_compacted_body():
    full = body(SYSTEM, user("I am Ada"), {"role": "assistant", "content": "Hi Ada"}, *tool_turn("c1", "r"))
    summary = compaction_request(full)
    assert summary["stream"] is False and is_compaction_request(summary)
    assert summary["messages"] == [SYSTEM, user("I am Ada"), {"role": "assistant", "content": "Hi Ada"},
                                   user(SUMMARY_PROMPT)]
    compacted = compacted_body(full, "Ada said hi.")
    assert compacted["messages"] == [SYSTEM, user(SUMMARY_PREFIX + "Ada said hi."), *tool_turn("c1", "r")]
    assert compacted["stream"] is True
    assert compaction_request(body(SYSTEM, user("only one"))) is None


def test_past_the_threshold_a_compaction_step_comes_first_then_the_compacted_call():
    initial = body(SYSTEM, user("x" * 800), {"role": "assistant", "content": "y" * 800}, user("now?"))
    request = LoopRequest(initial_body=initial, compact_threshold=100)
    first = next_action(request, [])
    assert isinstance(first, AppendSteps)
    assert is_compaction_request(first.steps[0].request_payload)
    summary_step = step(first.steps[0].request_payload, content="The user sent x's.")
    second = next_action(request, [summary_step])
    assert isinstance(second, AppendSteps)
    sent = second.steps[0].request_payload
    assert sent["messages"] == [SYSTEM, user(SUMMARY_PREFIX + "The user sent x's."), user("now?")]
    answer = step(sent)
    assert next_action(request, [summary_step, answer]) == Complete()


def test_a_follow_up_past_the_threshold_is_compacted_and_later_ones_build_on_it():
    initial = body(SYSTEM, user("look it up"))
    request = LoopRequest(initial_body=initial, compact_threshold=60)
    call = step(initial, content=None, calls=["c1"])
    tool = tool_step("c1", "z" * 400)
    action = next_action(request, [call, tool])
    assert is_compaction_request(action.steps[0].request_payload)
    summary = step(action.steps[0].request_payload, content="Looked it up.")
    action = next_action(request, [call, tool, summary])
    sent = action.steps[0].request_payload
    assert sent["messages"][:2] == [SYSTEM, user(SUMMARY_PREFIX + "Looked it up.")]
    assert sent["messages"][-1]["role"] == "tool"  # the last tool turn is kept whole
    # A failed summary is no reason to fail: the call goes on uncompacted.
    failed = dataclasses.replace(summary, state="failed", response_payload=None,
                                 error={"type": "upstream_error", "message": "x"})
    action = next_action(request, [call, tool, failed])
    assert not is_compaction_request(action.steps[0].request_payload)
    assert len(action.steps[0].request_payload["messages"]) == 4


def test_compaction_steps_do_not_count_against_the_iteration_cap():
    initial = body(SYSTEM, user("x" * 800), {"role": "assistant", "content": "y"}, user("go"))
    request = LoopRequest(initial_body=initial, compact_threshold=100, max_iterations=1)
    summary = step(next_action(request, []).steps[0].request_payload, content="s")
    action = next_action(request, [summary])
    assert isinstance(action, AppendSteps) and not is_compaction_request(action.steps[0].request_payload)


def test_context_length_exceeded_is_retried_once_truncated_when_auto():
    initial = body(SYSTEM, user("a" * 800), {"role": "assistant", "content": "b" * 800}, user("q"))
    too_long = {"type": "context_length_exceeded", "message": "maximum context length", "status": 400}
    refused = step(initial, state="failed", error=too_long)
    auto = LoopRequest(initial_body=initial, truncation=True)
    retry = next_action(auto, [refused])
    assert isinstance(retry, AppendSteps)
    # The oldest units go until the estimate is at most 3/4 of the refused request's.
    shorter = retry.steps[0].request_payload
    assert shorter["messages"] == [SYSTEM, {"role": "assistant", "content": "b" * 800}, user("q")]
    assert estimate_tokens(shorter) <= estimate_tokens(initial) * 3 // 4
    refused_again = step(retry.steps[0].request_payload, state="failed", error=too_long)
    assert isinstance(next_action(auto, [refused, refused_again]), Fail)
    assert isinstance(next_action(LoopRequest(initial_body=initial), [refused]), Fail)


def test_truncation_auto_with_a_known_window_fits_the_first_call():
    initial = body(SYSTEM, user("a" * 4000), {"role": "assistant", "content": "b"}, user("q"))
    request = LoopRequest(initial_body=initial, truncation=True, context_window=200)
    sent = next_action(request, []).steps[0].request_payload
    assert sent["messages"][0] == SYSTEM and sent["messages"][-1] == user("q")
    assert estimate_tokens(sent) <= 200 - 200 // 8
    untouched = LoopRequest(initial_body=initial, context_window=200)
    assert next_action(untouched, []).steps[0].request_payload == initial
