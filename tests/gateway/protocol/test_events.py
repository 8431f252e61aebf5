"""The SSE encoder and the ResponseBuilder, checked against the real OpenAI SDK.

Every stream the builder emits is decoded with the SDK's own SSE decoder, validated as its
``ResponseStreamEvent`` union and fed through its ``responses.stream()`` accumulator
(``ResponseStreamState``); the accumulated final response must equal ``builder.finish()``'s.
"""

from __future__ import annotations

import itertools
import re

import orjson
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai._streaming import SSEDecoder
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from executors.reassembly import Delta
from gateway.protocol.events import ResponseBuilder
from gateway.protocol.sse import DONE, encode_event, encode_fields
from gateway.testing.serving import serve_app
from store.types import MODEL_CALL, TOOL_CALL, Step

REQUEST = {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "client_fn"}]}
BASE = {"id": "resp_0abc", "created_at": 1700000000.25, "model": "m", "request": REQUEST}
HOSTED = frozenset({"lookup", "search"})
DONE_AT = 1700000009.0
EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
USAGE = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
_sequence = itertools.count(1)


# -- steps -------------------------------------------------------------------------------------


def completion(content=None, *, reasoning=None, refusal=None, calls=(), finish=None, usage=USAGE):
    message = {"role": "assistant", "content": content, "refusal": refusal}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in calls
        ]
    finish = finish or ("tool_calls" if calls else "stop")
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


def model_step(step_id, payload, *, state="completed"):
    return Step(
        id=step_id,
        response_id=BASE["id"],
        scope_parent=None,
        prev_step_id=None,
        sequence=next(_sequence),
        kind=MODEL_CALL,
        state=state,
        request_payload={"model": "m", "messages": []},
        response_payload=payload,
        error={"type": "upstream_error", "message": "cut"} if state == "failed" else None,
    )


def tool_step(step_id, call_id, name, arguments="{}", *, output=None, error=None):
    return Step(
        id=step_id,
        response_id=BASE["id"],
        scope_parent=None,
        prev_step_id=None,
        sequence=next(_sequence),
        kind=TOOL_CALL,
        state="failed" if error else "completed",
        request_payload={"name": name, "call_id": call_id, "arguments": arguments},
        response_payload=output,
        error={"type": "tool_error", "message": error} if error else None,
    )


def split(text, n=2):
    """``text`` in ``n`` pieces (some maybe empty)."""
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def deltas_for(payload, n=2):
    """The Deltas a reassembler reports for ``payload``: reasoning, text, refusal, tool calls."""
    message = payload["choices"][0]["message"]
    out = []
    for kind, key in (
        ("reasoning", "reasoning_content"),
        ("content", "content"),
        ("refusal", "refusal"),
    ):
        if message.get(key):
            out += [Delta(kind, piece) for piece in split(message[key], n)]
    for index, tc in enumerate(message.get("tool_calls") or ()):
        first, *rest = split(tc["function"]["arguments"], n)
        out.append(Delta("tool_call", first, index, tc["id"], tc["function"]["name"]))
        out += [Delta("tool_call", piece, index) for piece in rest]
    return out


# -- driving the builder -----------------------------------------------------------------------


def run(script, *, stream=True, status="completed", **finish):
    """Drive a builder through ``script``; return (emitted bytes, final response, builder).

    Script entries: ("model", step, deltas) or ("start", tool_step) or ("end", tool_step) or
    ("usage", chat_usage).
    """
    chunks = []
    builder = ResponseBuilder(BASE, hosted_tools=HOSTED, emit=chunks.append if stream else None)
    builder.start()
    for entry in script:
        if entry[0] == "model":
            _, step, deltas = entry
            for delta in deltas:
                builder.model_delta(step.id, delta)
            builder.model_call_finished(step)
        elif entry[0] == "start":
            builder.tool_call_started(entry[1])
        elif entry[0] == "end":
            builder.tool_call_finished(entry[1])
        else:
            builder.add_usage(entry[1])
    final = builder.finish(status, completed_at=DONE_AT, **finish)
    if not stream:
        assert chunks == []
    return b"".join(chunks), final, builder


def without_parsed(value):
    if isinstance(value, dict):
        return {
            k: without_parsed(v)
            for k, v in value.items()
            if k not in ("parsed", "parsed_arguments")
        }
    if isinstance(value, list):
        return [without_parsed(v) for v in value]
    return value


FRAME = re.compile(rb"event: ([a-z_.]+)\ndata: ([^\n]+)\n\n")


def check_stream(data, final):
    """Everything a client needs of a stream; returns the event dicts."""
    frames = FRAME.findall(data)
    assert b"".join(b"event: %s\ndata: %s\n\n" % f for f in frames) == data  # nothing else in it
    events = [orjson.loads(payload) for _, payload in frames]
    assert [e["type"].encode() for e in events] == [name for name, _ in frames]
    # Byte-exact: every frame, however it was assembled, is encode_event of its own event.
    assert b"".join(encode_event(event) for event in events) == data

    # The SDK: its SSE decoder, its event union (strictly validated), its accumulator.
    decoded = [sse.json() for sse in SSEDecoder().iter_bytes(iter([data]))]
    assert decoded == events
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(EVENTS.validate_python(event))
    Response.model_validate(final)
    if final["status"] == "completed":
        accumulated = state._completed_response
        assert accumulated is not None
        assert without_parsed(accumulated.to_dict()) == Response.model_validate(final).to_dict()

    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert (
        events[0]["response"]["output"] == [] and events[0]["response"]["status"] == "in_progress"
    )
    terminal = {
        "completed": "response.completed",
        "incomplete": "response.incomplete",
        "failed": "response.failed",
    }
    assert events[-1]["type"] == terminal[final["status"]]
    assert events[-1]["response"] == orjson.loads(orjson.dumps(final))
    assert all(not e.get("error") for e in events)  # a top-level error makes the SDK raise

    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == list(range(len(final["output"])))
    assert sorted(done) == added
    position = {(e["type"], e.get("output_index")): i for i, e in enumerate(events)}
    for index in added:
        assert (
            position[("response.output_item.added", index)]
            < position[("response.output_item.done", index)]
        )
        item = final["output"][index]
        done_item = next(
            e["item"]
            for e in events
            if e["type"] == "response.output_item.done" and e["output_index"] == index
        )
        assert done_item == item
    opened_parts = set()
    for e in events:
        key = (e.get("output_index"), e.get("content_index"))
        if e["type"] == "response.content_part.added":
            opened_parts.add(key)
        elif e["type"].endswith(".delta") and "content_index" in e:
            assert key in opened_parts
    return events


def types(events):
    return [e["type"] for e in events]


def stream_and_plain(script, **kwargs):
    """Run ``script`` streaming and not; both must give the same response."""
    data, final, _ = run(script, **kwargs)
    _, plain, _ = run(script, stream=False, **kwargs)
    assert plain == final
    return check_stream(data, final), final


# -- encode_event ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(
            {"type": "response.output_text.delta", "sequence_number": 3, "delta": "hi"},
            b"event: response.output_text.delta\n"
            b'data: {"type":"response.output_text.delta","sequence_number":3,"delta":"hi"}\n\n',
            id="simple",
        ),
        pytest.param(
            {"type": "x", "sequence_number": 0, "delta": "a\nb\r\n\u00e9\u2028"},
            b"event: x\n"
            b'data: {"type":"x","sequence_number":0,"delta":"a\\nb\\r\\n\xc3\xa9\xe2\x80\xa8"}\n\n',
            id="newlines-escaped-utf8-raw",
        ),
        pytest.param(
            {
                "type": "response.completed",
                "sequence_number": 9,
                "response": {"output": [], "usage": None},
            },
            b"event: response.completed\n"
            b'data: {"type":"response.completed","sequence_number":9,'
            b'"response":{"output":[],"usage":null}}\n\n',
            id="nested",
        ),
    ],
)
def test_encode_event_byte_exact(event, expected):
    assert encode_event(event) == expected


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["response.output_text.delta", "response.output_item.added", "x"]),
    st.integers(0, 10**9),
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("type", "sequence_number")),
        _json, min_size=0, max_size=4,
    ),
)
def test_encode_fields_is_encode_event(kind, sequence, fields):
    expected = encode_event({"type": kind, "sequence_number": sequence, **fields})
    assert encode_fields(kind, sequence, fields) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5),
    st.sampled_from(["content", "refusal", "reasoning"]),
)
def test_delta_frames_are_byte_exact(pieces, kind):
    """Text deltas are assembled from cached pieces: the same bytes as encode_event."""
    chunks = []
    builder = ResponseBuilder(BASE, hosted_tools=HOSTED, emit=chunks.append)
    builder.start()
    for piece in pieces:
        builder.model_delta("step_b1", Delta(kind, piece))
    assert len(chunks) > len(pieces)
    for chunk in chunks:
        event = orjson.loads(chunk[chunk.index(b"data: ") + 6 :])
        assert chunk == encode_event(event)


def test_done_marker():
    assert DONE == b"data: [DONE]\n\n"


# -- scenarios ---------------------------------------------------------------------------------


def test_text_answer_event_order():
    payload = completion("Hello there")
    events, final = stream_and_plain(
        [("model", model_step("step_a1", payload), deltas_for(payload, 3))]
    )
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2]["item"] == {
        "type": "message",
        "id": "msg_a1",
        "role": "assistant",
        "status": "in_progress",
        "content": [],
    }
    assert events[3]["part"] == {
        "type": "output_text",
        "text": "",
        "annotations": [],
        "logprobs": [],
    }
    assert all(e["logprobs"] == [] for e in events if e["type"].startswith("response.output_text"))
    assert final["output"] == [
        {
            "type": "message",
            "id": "msg_a1",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Hello there", "annotations": [], "logprobs": []}
            ],
            "phase": "final_answer",
        }
    ]
    assert final["usage"]["total_tokens"] == 14
    assert final["completed_at"] == int(DONE_AT) and final["created_at"] == 1700000000
    assert Response.model_validate(final).output_text == "Hello there"


def test_reasoning_then_text():
    payload = completion("42", reasoning="think hard")
    events, final = stream_and_plain(
        [("model", model_step("step_b", payload), deltas_for(payload))]
    )
    # Items stay open until their model call finishes (deltas of kinds may interleave).
    reasoning_events = [e["type"] for e in events if e.get("output_index") == 0]
    assert reasoning_events == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types(events)[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert events[2]["item"] == {
        "type": "reasoning",
        "id": "rs_b",
        "summary": [],
        "content": [],
        "status": "in_progress",
    }
    reasoning, message = final["output"]
    assert reasoning == {
        "type": "reasoning",
        "id": "rs_b",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "think hard"}],
        "status": "completed",
    }
    assert message["id"] == "msg_b" and message["content"][0]["text"] == "42"


def test_refusal():
    payload = completion(None, refusal="I can't help with that")
    events, final = stream_and_plain(
        [("model", model_step("step_c", payload), deltas_for(payload))]
    )
    assert "response.refusal.delta" in types(events)
    done = next(e for e in events if e["type"] == "response.refusal.done")
    assert done["refusal"] == "I can't help with that"
    assert final["output"][0]["content"] == [
        {"type": "refusal", "refusal": "I can't help with that"}
    ]


def test_two_client_function_calls():
    payload = completion(
        calls=[("call_1", "client_fn", '{"a": 1}'), ("call_2", "client_fn", '{"b": 2}')]
    )
    events, final = stream_and_plain(
        [("model", model_step("step_d", payload), deltas_for(payload))]
    )
    assert types(events)[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2]["item"] == {
        "type": "function_call",
        "id": "fc_d_0",
        "call_id": "call_1",
        "name": "client_fn",
        "arguments": "",
        "status": "in_progress",
    }
    assert [e["name"] for e in events if e["type"] == "response.function_call_arguments.done"] == [
        "client_fn"
    ] * 2
    assert final["output"] == [
        {
            "type": "function_call",
            "id": "fc_d_0",
            "call_id": "call_1",
            "name": "client_fn",
            "arguments": '{"a": 1}',
            "status": "completed",
        },
        {
            "type": "function_call",
            "id": "fc_d_1",
            "call_id": "call_2",
            "name": "client_fn",
            "arguments": '{"b": 2}',
            "status": "completed",
        },
    ]


def test_hosted_calls_completed_and_failed():
    payload = completion(
        "Looking up.", calls=[("call_1", "lookup", '{"q": "x"}'), ("call_2", "search", "{}")]
    )
    ok = tool_step("step_t1", "call_1", "lookup", output={"answer": 42})
    bad = tool_step("step_t2", "call_2", "search", error="HTTP 500 from tool")
    script = [
        ("model", model_step("step_e", payload), deltas_for(payload)),
        ("start", ok),
        ("start", bad),
        ("end", bad),  # tools finish in any order
        ("end", ok),
    ]
    events, final = stream_and_plain(script)
    message, first, second = final["output"]
    assert first == {
        "type": "mcp_call",
        "id": "mcp_e_0",
        "server_label": "stepchain",
        "name": "lookup",
        "arguments": '{"q": "x"}',
        "output": '{"answer":42}',
        "error": None,
        "status": "completed",
        "approval_request_id": None,
    }
    assert second["status"] == "failed" and second["output"] is None
    assert second["error"] == {"type": "mcp_tool_execution_error", "content": "HTTP 500 from tool"}
    # The hosted items stay open through the model call and close with their tool steps.
    names = types(events)
    assert names.index("response.mcp_call.in_progress") > names.index(
        "response.mcp_call_arguments.done"
    )
    assert (
        names[-6:]
        == [
            "response.mcp_call.in_progress",
            "response.mcp_call.in_progress",
            "response.mcp_call.failed",
            "response.output_item.done",
            "response.mcp_call.completed",
            "response.output_item.done",
            "response.completed",
        ][-6:]
    )
    assert "response.function_call_arguments.delta" not in names
    parsed = Response.model_validate(final)
    assert parsed.output[2].error.type == "mcp_tool_execution_error"


def test_string_tool_output_is_kept_as_text():
    payload = completion(calls=[("call_1", "lookup", "{}")])
    step = tool_step("step_t", "call_1", "lookup", output="plain text")
    _, final, _ = run(
        [("model", model_step("step_f", payload), []), ("start", step), ("end", step)]
    )
    assert final["output"][0]["output"] == "plain text"


def test_two_iterations_one_lifecycle():
    first = completion(
        reasoning="need data",
        calls=[("call_1", "lookup", '{"q":1}')],
        usage={"prompt_tokens": 5, "completion_tokens": 2},
    )
    second = completion(
        "It is 42.",
        usage={
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 5},
        },
    )
    tool = tool_step("step_2b", "call_1", "lookup", output=42)
    script = [
        ("model", model_step("step_1a", first), deltas_for(first)),
        ("start", tool),
        ("end", tool),
        ("usage", {"prompt_tokens": 100, "completion_tokens": 1}),  # a sub-agent's model call
        ("model", model_step("step_3c", second), deltas_for(second)),
    ]
    events, final = stream_and_plain(script)
    assert [item["id"] for item in final["output"]] == ["rs_1a", "mcp_1a_0", "msg_3c"]
    assert types(events).count("response.created") == 1
    assert types(events).count("response.completed") == 1
    assert final["usage"] == {
        "input_tokens": 114,
        "input_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 120,
    }
    assert Response.model_validate(final).output_text == "It is 42."


def test_non_streaming_upstream_opens_items_in_full():
    """model_call_finished without deltas (a non-streaming upstream, or a replay): same output
    and ids as the live stream, and every item still gets its events."""
    payload = completion(
        "Hi!", reasoning="r", calls=[("call_1", "lookup", '{"a":1}'), ("call_2", "client_fn", "{}")]
    )
    tool = tool_step("step_t", "call_1", "lookup", output={"ok": True})
    live = [
        ("model", model_step("step_g", payload), deltas_for(payload)),
        ("start", tool),
        ("end", tool),
    ]
    replay = [("model", model_step("step_g", payload), []), ("start", tool), ("end", tool)]
    _, live_final, _ = run(live)
    events, replay_final = stream_and_plain(replay)
    assert replay_final == live_final
    names = types(events)
    for kind in ("reasoning_text", "output_text", "mcp_call_arguments", "function_call_arguments"):
        assert names.count(f"response.{kind}.delta") == 1


def test_streamed_text_differing_from_payload_ends_with_payload():
    payload = completion("Hello world")
    step = model_step("step_h", payload)
    events, final = stream_and_plain([("model", step, [Delta("content", "Hello")])])
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["Hello", " world"]
    assert final["output"][0]["content"][0]["text"] == "Hello world"


def test_failed_model_call_keeps_partial_output():
    partial = completion("Hal", calls=[("call_1", "lookup", '{"q"')], finish=None, usage=None)
    partial["choices"][0]["finish_reason"] = None
    step = model_step("step_i", partial, state="failed")
    deltas = [Delta("content", "Hal"), Delta("tool_call", '{"q"', 0, "call_1", "lookup")]
    error = {"code": "server_error", "message": "upstream stream cut"}
    events, final = stream_and_plain([("model", step, deltas)], status="failed", error=error)
    assert final["status"] == "failed" and final["error"] == error
    assert [item["status"] for item in final["output"]] == ["incomplete", "incomplete"]
    assert "response.mcp_call.in_progress" not in types(events)


def test_failed_model_call_without_payload():
    step = model_step("step_j", None, state="failed")
    events, final = stream_and_plain(
        [("model", step, [Delta("reasoning", "hm"), Delta("content", "par")])],
        status="failed",
        error={"code": "server_error", "message": "x"},
    )
    assert [(i["type"], i["status"]) for i in final["output"]] == [
        ("reasoning", "incomplete"),
        ("message", "incomplete"),
    ]
    assert final["output"][1]["content"][0]["text"] == "par"


def test_length_finish_is_incomplete():
    payload = completion("truncat", finish="length")
    events, final = stream_and_plain(
        [("model", model_step("step_k", payload), deltas_for(payload))],
        status="incomplete",
        incomplete_details={"reason": "max_output_tokens"},
    )
    assert final["output"][0]["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_finish_closes_open_items():
    """The loop stopped mid-call (e.g. a store error): open items end incomplete."""
    chunks = []
    builder = ResponseBuilder(BASE, hosted_tools=HOSTED, emit=chunks.append)
    builder.start()
    builder.model_delta("step_l", Delta("content", "par"))
    builder.model_delta("step_l", Delta("tool_call", "{", 0, "call_1", "client_fn"))
    builder.model_delta("step_l", Delta("tool_call", "{", 1, "call_2", "lookup"))
    builder.model_delta("step_l", Delta("tool_call", "", 2))  # never named: never shown
    final = builder.finish(
        "failed", error={"code": "server_error", "message": "store error"}, completed_at=DONE_AT
    )
    assert [(i["type"], i["status"]) for i in final["output"]] == [
        ("message", "incomplete"),
        ("function_call", "incomplete"),
        ("mcp_call", "incomplete"),
    ]
    check_stream(b"".join(chunks), final)
    assert builder.finish("completed") is final  # idempotent, emits nothing more
    assert b"".join(chunks).count(b"event: response.failed") == 1


def test_hosted_calls_never_run_are_closed_incomplete():
    payload = completion(calls=[("call_1", "lookup", "{}")])
    events, final = stream_and_plain(
        [("model", model_step("step_m", payload), deltas_for(payload))],
        status="incomplete",
        incomplete_details={"reason": "max_output_tokens"},
    )
    assert final["output"][0]["status"] == "incomplete"


def test_tool_step_of_an_unreported_model_call():
    """After a resume the loop may report a tool step whose model call it did not replay."""
    tool = tool_step("step_n", "call_9", "lookup", '{"x":1}', output=[1, 2])
    events, final = stream_and_plain([("start", tool), ("end", tool)])
    assert final["output"] == [
        {
            "type": "mcp_call",
            "id": "mcp_n",
            "server_label": "stepchain",
            "name": "lookup",
            "arguments": '{"x":1}',
            "output": "[1,2]",
            "error": None,
            "status": "completed",
            "approval_request_id": None,
        }
    ]


def test_tool_call_indexes_with_gaps():
    """Item ids number tool calls by first appearance, as the completion lists them."""
    payload = completion(
        calls=[("call_1", "client_fn", '{"a":1}'), ("call_2", "lookup", '{"b":2}')]
    )
    deltas = [
        Delta("tool_call", '{"a":', 1, "call_1", "client_fn"),
        Delta("tool_call", '{"b":2}', 3, "call_2", "lookup"),
        Delta("tool_call", "1}", 1),
    ]
    events, final = stream_and_plain([("model", model_step("step_o", payload), deltas)])
    _, replayed, _ = run([("model", model_step("step_o", payload), [])])
    assert final == replayed
    assert [item["id"] for item in final["output"]] == ["fc_o_0", "mcp_o_1"]


def test_late_deltas_of_a_finished_call_are_ignored():
    chunks = []
    builder = ResponseBuilder(BASE, hosted_tools=HOSTED, emit=chunks.append)
    builder.start()
    payload = completion("a")
    builder.model_call_finished(model_step("step_p", payload))
    builder.model_delta("step_p", Delta("content", "late"))
    final = builder.finish("completed", completed_at=DONE_AT)
    assert final["output"][0]["content"][0]["text"] == "a"
    check_stream(b"".join(chunks), final)


def test_usage_defaults_to_zero():
    _, final, builder = run([], status="completed")
    assert final["usage"]["total_tokens"] == 0
    assert builder.usage == final["usage"]


# -- the real client over HTTP -----------------------------------------------------------------


def test_openai_client_streams_and_parses():
    """The OpenAI SDK (``responses.stream`` and ``create``) over a real HTTP server."""
    payload = completion("Done.", reasoning="plan", calls=[("call_1", "lookup", '{"q":1}')])
    second = completion("The answer is 42.")
    tool = tool_step("step_t", "call_1", "lookup", output={"answer": 42})
    script = [
        ("model", model_step("step_q", payload), deltas_for(payload)),
        ("start", tool),
        ("end", tool),
        ("model", model_step("step_r", second), deltas_for(second)),
    ]
    data, final, _ = run(script)

    async def responses(request: Request) -> HTTPResponse:
        body = orjson.loads(await request.body())
        if body.get("stream"):
            return HTTPResponse(data + DONE, media_type="text/event-stream")
        return HTTPResponse(orjson.dumps(final), media_type="application/json")

    app = Starlette(routes=[Route("/v1/responses", responses, methods=["POST"])])
    with serve_app(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
        with client.responses.stream(model="m", input="hi") as stream:
            seen = [event.type for event in stream]
            streamed = stream.get_final_response()
        created = client.responses.create(model="m", input="hi")
        client.close()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert streamed.output_text == "Done.The answer is 42."
    assert (
        without_parsed(streamed.to_dict())
        == created.to_dict()
        == Response.model_validate(final).to_dict()
    )
    assert [item.type for item in created.output] == ["reasoning", "message", "mcp_call", "message"]


# -- hypothesis: any interleaving ----------------------------------------------------------------

_pieces = st.lists(st.text(max_size=5), min_size=1, max_size=4)


@st.composite
def model_turns(draw, conventional):
    """One or two model calls with hosted and client tool calls, their Deltas in a random
    interleaving, and the tool steps of the hosted calls finishing in a random order.

    ``conventional``: each stream starts after the one before it (reasoning, text, refusal,
    tool calls by index), as upstreams send them; otherwise streams start in any order.
    """
    script = []
    turns = draw(st.integers(1, 2))
    for turn in range(turns):
        step_id = f"step_{turn}x"
        reasoning = draw(st.one_of(st.none(), _pieces))
        content = draw(st.one_of(st.none(), _pieces))
        refusal = draw(st.one_of(st.none(), _pieces)) if draw(st.booleans()) else None
        names = draw(st.lists(st.sampled_from(["lookup", "search", "client_fn"]), max_size=3))
        if turn < turns - 1:
            names = [n for n in names if n != "client_fn"]  # client calls end the response
        calls = [(f"call_{turn}_{i}", name, draw(_pieces)) for i, name in enumerate(names)]
        payload = completion(
            "".join(content) if content else None,
            reasoning="".join(reasoning) if reasoning else None,
            refusal="".join(refusal) if refusal else None,
            calls=[(cid, name, "".join(args)) for cid, name, args in calls],
        )
        # Text streams have no empty pieces (the reassembler drops them); tool calls may.
        streams = [
            [Delta(kind, piece) for piece in pieces if piece]
            for kind, pieces in (
                ("reasoning", reasoning),
                ("content", content),
                ("refusal", refusal),
            )
            if pieces and any(pieces)
        ]
        for index, (cid, name, args) in enumerate(calls):
            first, *rest = args
            streams.append(
                [Delta("tool_call", first, index, cid, name)]
                + [Delta("tool_call", p, index) for p in rest]
            )
        deltas = []
        started = 0  # conventional: streams[: started + 1] may run
        first_tool = next_tool = len(streams) - len(calls)
        while any(streams):
            # Tool calls always start in index order (item ids number them by first appearance).
            live = [
                k
                for k, s in enumerate(streams)
                if s and (k <= started if conventional else k < first_tool or k <= next_tool)
            ]
            k = draw(st.sampled_from(live))
            started = max(started, k + 1)
            if k >= first_tool:
                next_tool = max(next_tool, k + 1)
            deltas.append(streams[k].pop(0))
        script.append(("model", model_step(step_id, payload), deltas))
        hosted = [
            tool_step(
                f"step_{turn}t{i}",
                cid,
                name,
                args[0],
                output={"i": i},
                error="boom" if i % 2 else None,
            )
            for i, (cid, name, args) in enumerate(calls)
            if name != "client_fn"
        ]
        script += [("start", t) for t in hosted]
        script += [("end", t) for t in draw(st.permutations(hosted))]
    return script


@settings(max_examples=150, deadline=None)
@given(model_turns(conventional=True))
def test_any_conventional_interleaving_matches_non_streaming(script):
    data, final, _ = run(script)
    check_stream(data, final)
    replay = [(e[0], e[1], []) if e[0] == "model" else e for e in script]
    _, plain, _ = run(replay, stream=False)
    assert final == plain
    assert [item["status"] for item in final["output"]] == [
        "failed" if item.get("error") else "completed" for item in final["output"]
    ]


@settings(max_examples=100, deadline=None)
@given(model_turns(conventional=False))
def test_any_interleaving_is_accepted_by_the_sdk(script):
    data, final, _ = run(script)
    check_stream(data, final)
    replay = [(e[0], e[1], []) if e[0] == "model" else e for e in script]
    _, plain, _ = run(replay, stream=False)

    # Out of the usual order, items and message parts list in the order they opened.
    def canonical(output):
        items = [
            (
                {**item, "content": sorted(item["content"], key=lambda p: p["type"])}
                if item["type"] == "message"
                else item
            )
            for item in output
        ]
        return sorted(items, key=lambda item: item["id"])

    assert canonical(final["output"]) == canonical(plain["output"])
    assert final["usage"] == plain["usage"]


def test_held_events_wait_for_finish_and_keep_their_numbers():
    """hold_events (the last model call is stored with the result): its ``*.done`` events are
    not emitted until finish, then come one by one, in order, right before the terminal event."""
    payload = completion("Hello there")
    step = model_step("step_h1", payload)
    chunks: list[bytes] = []
    builder = ResponseBuilder(BASE, hosted_tools=HOSTED, emit=chunks.append)
    builder.start()
    for delta in deltas_for(payload, 2):
        builder.model_delta(step.id, delta)
    streamed = len(chunks)
    builder.hold_events()
    builder.model_call_finished(step)
    assert len(chunks) == streamed  # nothing about the unstored step went out
    final = builder.finish("completed", completed_at=DONE_AT)
    events = check_stream(b"".join(chunks), final)
    assert len(chunks) == len(events)  # one log entry per event: entry i is sequence number i
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert types(events)[streamed:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    # Unheld, the same script gives the same bytes: holding changes timing, never content.
    plain, _final, _builder = run([("model", step, deltas_for(payload, 2))])
    assert plain == b"".join(chunks)


def test_hold_events_is_a_no_op_without_a_stream():
    builder = ResponseBuilder(BASE, hosted_tools=HOSTED, emit=None)
    builder.start()
    builder.hold_events()
    builder.model_call_finished(model_step("step_h2", completion("Hi")))
    assert builder.finish("completed", completed_at=DONE_AT)["output"][0]["status"] == "completed"
