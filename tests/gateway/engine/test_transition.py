"""The transition function, exhaustively: pure, deterministic, and every call_id answered once."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.transition import (
    AppendSteps,
    ChainNotSettledError,
    Complete,
    Fail,
    Incomplete,
    LoopRequest,
    next_action,
)
from store.types import MODEL_CALL, TOOL_CALL, Step, StepDescriptor

INITIAL = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
_ids = itertools.count()


def model_step(calls=(), *, state="completed", content="ok", finish=None, request=None):
    tool_calls = [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
        for cid, name, args in calls
    ]
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    completion = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish or ("tool_calls" if tool_calls else "stop"),
            }
        ],
    }
    n = next(_ids)
    return Step(
        id=f"step_{n:04d}",
        response_id="resp_1",
        scope_parent=None,
        prev_step_id=None,
        sequence=n,
        kind=MODEL_CALL,
        state=state,
        request_payload=request or INITIAL,
        response_payload=completion if state == "completed" else None,
        error={"type": "upstream_error", "message": "boom"} if state == "failed" else None,
    )


def tool_step(call_id, name, *, state="completed", output=None):
    n = next(_ids)
    return Step(
        id=f"step_{n:04d}",
        response_id="resp_1",
        scope_parent=None,
        prev_step_id=None,
        sequence=n,
        kind=TOOL_CALL,
        state=state,
        request_payload={"name": name, "call_id": call_id, "arguments": "{}"},
        response_payload=output if state == "completed" else None,
        error={"type": "http_error", "message": f"{call_id} broke"} if state == "failed" else None,
    )


def test_empty_chain_starts_with_the_request_body():
    action = next_action(LoopRequest(INITIAL), [])
    assert action == AppendSteps((StepDescriptor(MODEL_CALL, INITIAL),))


def test_text_answer_completes():
    assert next_action(LoopRequest(INITIAL), [model_step()]) == Complete()


def test_failed_model_call_fails_with_its_error():
    action = next_action(LoopRequest(INITIAL), [model_step(state="failed")])
    assert action == Fail({"type": "upstream_error", "message": "boom"})


@pytest.mark.parametrize(
    ("finish", "reason"),
    [pytest.param("length", "max_output_tokens", id="length"),
     pytest.param("content_filter", "content_filter", id="content-filter")],
)
def test_finish_reasons_that_end_incomplete(finish, reason):
    assert next_action(LoopRequest(INITIAL), [model_step(finish=finish)]) == Incomplete(reason)


def test_tool_calls_become_one_step_each_keyed_by_call_id():
    chain = [model_step([("call_a", "weather", '{"city":"Oslo"}'), ("call_b", "time", "{}")])]
    action = next_action(LoopRequest(INITIAL), chain)
    assert isinstance(action, AppendSteps)
    assert [d.kind for d in action.steps] == [TOOL_CALL, TOOL_CALL]
    assert [d.request_payload for d in action.steps] == [
        {"name": "weather", "call_id": "call_a", "arguments": '{"city":"Oslo"}'},
        {"name": "time", "call_id": "call_b", "arguments": "{}"},
    ]


def test_follow_up_pairs_outputs_by_call_id_not_position():
    model = model_step([("call_a", "weather", "{}"), ("call_b", "time", "{}")])
    # Recorded in the opposite order on purpose: pairing must use call_id.
    tools = [tool_step("call_b", "time", output={"t": 1}), tool_step("call_a", "weather", state="failed")]
    action = next_action(LoopRequest(INITIAL), [model, *tools])
    assert isinstance(action, AppendSteps)
    (descriptor,) = action.steps
    messages = descriptor.request_payload["messages"]
    assert messages[:-3] == INITIAL["messages"]
    assistant, first, second = messages[-3:]
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_a", "call_b"]
    assert first == {"role": "tool", "tool_call_id": "call_a", "content": "Error: call_a broke"}
    assert second == {"role": "tool", "tool_call_id": "call_b", "content": '{"t":1}'}


def test_client_only_calls_complete_for_the_client():
    chain = [model_step([("call_a", "client_fn", "{}")])]
    assert next_action(LoopRequest(INITIAL, client_tools=frozenset({"client_fn"})), chain) == Complete()


def test_mixed_turn_runs_server_calls_then_completes():
    request = LoopRequest(INITIAL, client_tools=frozenset({"client_fn"}))
    model = model_step([("call_a", "client_fn", "{}"), ("call_b", "weather", "{}")])
    action = next_action(request, [model])
    assert isinstance(action, AppendSteps)
    assert [d.request_payload["call_id"] for d in action.steps] == ["call_b"]
    assert next_action(request, [model, tool_step("call_b", "weather", output=1)]) == Complete()


def test_unsettled_chain_is_refused():
    model = model_step([("call_a", "weather", "{}")])
    with pytest.raises(ChainNotSettledError):
        next_action(LoopRequest(INITIAL), [model, tool_step("call_a", "weather", state="processing")])
    with pytest.raises(ChainNotSettledError):
        next_action(LoopRequest(INITIAL), [model_step(state="pending")])


def test_iteration_cap_ends_incomplete():
    request = LoopRequest(INITIAL, max_iterations=3)
    chain = [model_step([("c1", "t", "{}")]), tool_step("c1", "t", output=1), model_step([("c2", "t", "{}")])]
    assert next_action(request, chain) == Incomplete("max_iterations_exceeded")
    # One below the cap the loop goes on.
    assert isinstance(next_action(LoopRequest(INITIAL, max_iterations=4), chain), AppendSteps)


def test_max_tool_calls_rejects_calls_past_the_cap():
    request = LoopRequest(INITIAL, max_tool_calls=1)
    action = next_action(request, [model_step([("c1", "t", "{}"), ("c2", "t", "{}")])])
    assert "rejected" not in action.steps[0].request_payload
    assert action.steps[1].request_payload["rejected"] == "max_tool_calls"


def test_long_tool_output_is_truncated_for_the_model_only():
    model = model_step([("c1", "t", "{}")])
    big = "x" * 60_000
    tool = tool_step("c1", "t", output=big)
    action = next_action(LoopRequest(INITIAL, tool_output_max_bytes=1000), [model, tool])
    content = action.steps[0].request_payload["messages"][-1]["content"]
    assert content.startswith("x" * 1000)
    assert len(content) < 1200 and "truncated" in content
    assert tool.response_payload == big


# -- properties over arbitrary chains ----------------------------------------------------------

call_names = st.sampled_from(["weather", "time", "search", "client_fn"])
turn = st.lists(
    st.tuples(call_names, st.sampled_from(["completed", "failed", "canceled"]), st.integers(0, 99)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(turns=st.lists(turn, min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_every_follow_up_answers_every_call_id_once_in_model_order(turns, seed):
    rng = random.Random(seed)
    request = LoopRequest(INITIAL, client_tools=frozenset(), max_iterations=100)
    chain: list[Step] = []
    action = next_action(request, chain)
    for calls in turns:
        # The model answers the pending model call with these tool calls.
        assert isinstance(action, AppendSteps) and action.steps[0].kind == MODEL_CALL
        ids = [f"call_{next(_ids)}" for _ in calls]
        model = model_step(
            [(cid, name, "{}") for cid, (name, _, _) in zip(ids, calls)],
            request=action.steps[0].request_payload,
        )
        chain.append(model)
        before = copy.deepcopy(chain)
        action = next_action(request, chain)
        assert chain == before  # pure: the chain is not touched
        assert isinstance(action, AppendSteps)
        assert [d.request_payload["call_id"] for d in action.steps] == ids
        tools = [
            tool_step(cid, name, state=state, output={"v": value})
            for cid, (name, state, value) in zip(ids, calls)
        ]
        rng.shuffle(tools)  # finished and recorded in any order
        chain.extend(tools)
        action = next_action(request, chain)
        assert action == next_action(request, chain)  # deterministic
        assert isinstance(action, AppendSteps)
        messages = action.steps[0].request_payload["messages"]
        tool_messages = messages[-len(ids):]
        assistant = messages[-len(ids) - 1]
        assert [c["id"] for c in assistant["tool_calls"]] == ids
        assert [m["tool_call_id"] for m in tool_messages] == ids
        by_id = {t.request_payload["call_id"]: t for t in tools}
        for message in tool_messages:
            step = by_id[message["tool_call_id"]]
            if step.state == "completed":
                assert message["content"] == '{"v":%d}' % step.response_payload["v"]
            else:
                assert message["content"].startswith("Error: ")
    # The conversation so far is a prefix of every later model call.
    model_calls = [s for s in chain if s.kind == MODEL_CALL]
    for earlier, later in zip(model_calls, model_calls[1:]):
        n = len(earlier.request_payload["messages"])
        assert later.request_payload["messages"][:n] == earlier.request_payload["messages"]


@settings(max_examples=200, deadline=None)
@given(
    turns=st.lists(turn, min_size=1, max_size=5),
    cap=st.integers(1, 12),
    client=st.booleans(),
)
def test_loop_always_ends_within_the_cap(turns, cap, client):
    """Driving the transition function as the loop does never exceeds max_iterations batches."""
    request = LoopRequest(
        INITIAL, client_tools=frozenset({"client_fn"}) if client else frozenset(), max_iterations=cap
    )
    chain: list[Step] = []
    script = iter(turns)
    batches = 0
    while True:
        action = next_action(request, chain)
        if not isinstance(action, AppendSteps):
            break
        batches += 1
        assert batches <= cap
        if action.steps[0].kind == MODEL_CALL:
            calls = next(script, [])
            ids = [f"call_{next(_ids)}" for _ in calls]
            chain.append(
                model_step([(i, n, "{}") for i, (n, _, _) in zip(ids, calls)],
                           request=action.steps[0].request_payload)
            )
        else:
            for d in action.steps:
                chain.append(tool_step(d.request_payload["call_id"], d.request_payload["name"], output=1))
    assert isinstance(action, (Complete, Incomplete))
    if isinstance(action, Incomplete):
        assert action.reason == "max_iterations_exceeded" and batches == cap
