"""Responses ↔ Chat Completions conversion: every mapping of the reference, validation errors with
their ``param``, resent openai-agents history, and the tool-message invariant under hypothesis."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response

from gateway.errors import InvalidRequestError
from gateway.protocol.convert import (
    build_chat_request,
    items_to_messages,
    normalize_input,
    tools_to_chat,
)
from gateway.protocol.response_object import response_object
from gateway.protocol.usage import add_chat_usage, add_usage, chat_usage_to_response_usage, zero_usage
from gateway.protocol.validation import validate_call_outputs, validate_request

RID = "resp_00ab"


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


def fc(call_id, name="f", arguments="{}", **extra):
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        **extra,
    }


def fco(call_id, output="ok"):
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def mcp(item_id, name="lookup", arguments="{}", output="42", error=None, status="completed"):
    return {
        "type": "mcp_call",
        "id": item_id,
        "server_label": "stepchain",
        "name": name,
        "arguments": arguments,
        "output": output,
        "error": error,
        "status": status,
        "approval_request_id": None,
    }


def out_msg(text, item_id="msg_x"):
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def convert(items):
    return items_to_messages(normalize_input(items, RID))


def call(call_id, name="f", arguments="{}"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- normalize_input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            "hi",
            [
                {
                    "type": "message",
                    "id": "msg_00ab_0",
                    "role": "user",
                    "status": "completed",
                    "content": [{"type": "input_text", "text": "hi"}],
                }
            ],
            id="string-input",
        ),
        pytest.param(
            [user("a"), {"role": "assistant", "content": "b"}],
            [
                {
                    "type": "message",
                    "id": "msg_00ab_0",
                    "role": "user",
                    "status": "completed",
                    "content": [{"type": "input_text", "text": "a"}],
                },
                {
                    "type": "message",
                    "id": "msg_00ab_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "b", "annotations": []}],
                },
            ],
            id="easy-messages",
        ),
        pytest.param(
            [out_msg("x", "msg_client")],
            [out_msg("x", "msg_client")],
            id="client-id-kept",
        ),
        pytest.param(
            [fc("call_1"), fco("call_1")],
            [
                {**fc("call_1"), "id": "fc_00ab_0", "status": "completed"},
                {**fco("call_1"), "id": "fco_00ab_1", "status": "completed"},
            ],
            id="function-call-and-output",
        ),
        pytest.param(
            [
                {
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "t"}],
                }
            ],
            [
                {
                    "type": "reasoning",
                    "id": "rs_00ab_0",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "t"}],
                }
            ],
            id="reasoning",
        ),
        pytest.param([mcp("mcp_1_0")], [mcp("mcp_1_0")], id="mcp-call"),
    ],
)
def test_normalize_input(raw, expected):
    original = copy.deepcopy(raw)
    assert normalize_input(raw, RID) == expected
    assert raw == original  # the client's request is not modified
    assert normalize_input(raw, RID) == normalize_input(raw, RID)  # stable ids


IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}
FILE = {"type": "input_file", "file_data": "data:application/pdf;base64,AAAA", "filename": "a.pdf"}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        pytest.param(42, "input", id="input-not-list"),
        pytest.param(["hi"], "input[0]", id="item-not-object"),
        pytest.param(
            [user("a"), {"role": "robot", "content": "x"}], "input[1].role", id="bad-role"
        ),
        pytest.param([{"role": "user", "content": 3}], "input[0].content", id="content-not-list"),
        pytest.param([user([{"type": "video"}])], "input[0].content[0].type", id="unknown-part"),
        pytest.param(
            [user([{"type": "input_text", "text": 1}])],
            "input[0].content[0].text",
            id="text-not-str",
        ),
        pytest.param([user(["x"])], "input[0].content[0]", id="part-not-object"),
        pytest.param(
            [user([{"type": "input_image", "file_id": "file_1"}])],
            "input[0].content[0].file_id",
            id="image-file-id",
        ),
        pytest.param(
            [user([{"type": "input_image"}])], "input[0].content[0].image_url", id="image-no-url"
        ),
        pytest.param(
            [user([{**IMAGE, "detail": "huge"}])],
            "input[0].content[0].detail",
            id="image-bad-detail",
        ),
        pytest.param(
            [user([{"type": "input_file", "file_id": "file_1"}])],
            "input[0].content[0].file_id",
            id="file-id",
        ),
        pytest.param(
            [user([{"type": "input_file", "file_url": "https://x/a.pdf"}])],
            "input[0].content[0].file_url",
            id="file-url",
        ),
        pytest.param(
            [{"role": "assistant", "content": [IMAGE]}],
            "input[0].content[0].type",
            id="image-from-assistant",
        ),
        pytest.param(
            [user("a"), {"type": "item_reference"}],
            "input[1].id",
            id="item-reference-without-id",
        ),
        pytest.param(
            [{"type": "web_search_call", "id": "ws_1"}], "input[0].type", id="hosted-openai-item"
        ),
        pytest.param([{"content": "x"}], "input[0].type", id="no-type-no-role"),
        pytest.param([{**fc("c"), "call_id": ""}], "input[0].call_id", id="fc-empty-call-id"),
        pytest.param([{**fc("c"), "name": None}], "input[0].name", id="fc-no-name"),
        pytest.param(
            [{**fc("c"), "arguments": {}}], "input[0].arguments", id="fc-arguments-object"
        ),
        pytest.param([{**fco("c"), "output": 5}], "input[0].output", id="fco-output-int"),
        pytest.param(
            [fco("c", [{"type": "input_text", "text": None}])],
            "input[0].output[0].text",
            id="fco-part",
        ),
        pytest.param([{**mcp("m"), "output": {"a": 1}}], "input[0].output", id="mcp-output-object"),
        pytest.param([{**user("a"), "id": 7}], "input[0].id", id="id-not-str"),
        pytest.param([{**mcp("m"), "call_id": {"a": 1}}], "input[0].call_id", id="mcp-call-id-object"),
        pytest.param([{**mcp("m"), "call_id": 5}], "input[0].call_id", id="mcp-call-id-int"),
        pytest.param(
            [{"type": "reasoning", "summary": "s"}],
            "input[0].summary",
            id="reasoning-summary-not-list",
        ),
    ],
)
def test_normalize_input_errors(raw, param):
    with pytest.raises(InvalidRequestError) as info:
        normalize_input(raw, RID)
    assert info.value.param == param
    assert info.value.status_code == 400


# -- items → messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "messages"),
    [
        pytest.param([user("hi")], [{"role": "user", "content": "hi"}], id="user-string"),
        pytest.param(
            [{"role": "developer", "content": "be brief"}],
            [{"role": "system", "content": "be brief"}],
            id="developer-to-system",
        ),
        pytest.param(
            [{"role": "system", "content": "s"}], [{"role": "system", "content": "s"}], id="system"
        ),
        pytest.param(
            [user([{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}])],
            [{"role": "user", "content": "a\nb"}],
            id="text-parts-joined",
        ),
        pytest.param(
            [user([{"type": "input_text", "text": "look"}, IMAGE])],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                        },
                    ],
                }
            ],
            id="image-part",
        ),
        pytest.param(
            [user([{"type": "input_image", "image_url": "https://x/a.png"}])],
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/a.png", "detail": "auto"},
                        }
                    ],
                }
            ],
            id="image-default-detail",
        ),
        pytest.param(
            [user([FILE])],
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "file",
                            "file": {
                                "file_data": "data:application/pdf;base64,AAAA",
                                "filename": "a.pdf",
                            },
                        }
                    ],
                }
            ],
            id="file-part",
        ),
        pytest.param(
            [out_msg("hello")], [{"role": "assistant", "content": "hello"}], id="output-message"
        ),
        pytest.param(
            [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "refusal", "refusal": "no"}],
                }
            ],
            [{"role": "assistant", "content": "no"}],
            id="refusal-as-text",
        ),
        pytest.param(
            [fc("c1", "a"), fc("c2", "b"), fco("c1", "r1"), fco("c2", "r2")],
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("c1", "a"), call("c2", "b")],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                {"role": "tool", "tool_call_id": "c2", "content": "r2"},
            ],
            id="consecutive-calls-one-message",
        ),
        pytest.param(
            [out_msg("let me check"), fc("c1"), fco("c1")],
            [
                {"role": "assistant", "content": "let me check", "tool_calls": [call("c1")]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
            id="message-merges-with-calls",
        ),
        pytest.param(
            [
                out_msg("thinking done"),
                {"type": "reasoning", "summary": []},
                fc("c1"),
                {"type": "reasoning", "summary": []},
                fc("c2"),
                fco("c2"),
                fco("c1"),
            ],
            [
                {
                    "role": "assistant",
                    "content": "thinking done",
                    "tool_calls": [call("c1"), call("c2")],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                {"role": "tool", "tool_call_id": "c2", "content": "ok"},
            ],
            id="reasoning-dropped-never-splits",
        ),
        pytest.param(
            [mcp("mcp_s_0", output='{"x": 1}'), fc("c1"), fco("c1", "done")],
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("mcp_s_0", "lookup"), call("c1")],
                },
                {"role": "tool", "tool_call_id": "mcp_s_0", "content": '{"x": 1}'},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
            id="mcp-call-answers-itself",
        ),
        pytest.param(
            [
                mcp(
                    "mcp_s_0",
                    output=None,
                    status="failed",
                    error={"type": "mcp_tool_execution_error", "content": "HTTP 500"},
                )
            ],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("mcp_s_0", "lookup")]},
                {"role": "tool", "tool_call_id": "mcp_s_0", "content": "Error: HTTP 500"},
            ],
            id="mcp-call-failed",
        ),
        pytest.param(
            [mcp("mcp_s_0", output=None, status="incomplete")],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("mcp_s_0", "lookup")]},
                {
                    "role": "tool",
                    "tool_call_id": "mcp_s_0",
                    "content": "Error: the tool call did not finish",
                },
            ],
            id="mcp-call-unfinished",
        ),
        pytest.param(
            [{**mcp("mcp_s_0"), "call_id": "call_7"}],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("call_7", "lookup")]},
                {"role": "tool", "tool_call_id": "call_7", "content": "42"},
            ],
            id="mcp-call-with-call-id",
        ),
        pytest.param(
            [fc("c1"), user("meanwhile"), fco("c1", "late")],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("c1")]},
                {"role": "tool", "tool_call_id": "c1", "content": "late"},
                {"role": "user", "content": "meanwhile"},
            ],
            id="late-output-moved-up",
        ),
        pytest.param(
            [user("q"), fc("c1"), fc("c2"), fco("c2")],
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [call("c2")]},
                {"role": "tool", "tool_call_id": "c2", "content": "ok"},
            ],
            id="unanswered-call-dropped",
        ),
        pytest.param(
            [out_msg("hm"), fc("c1")],
            [{"role": "assistant", "content": "hm"}],
            id="unanswered-call-keeps-text",
        ),
        pytest.param(
            [fco("c9"), user("q")], [{"role": "user", "content": "q"}], id="orphan-output-dropped"
        ),
        pytest.param(
            [fc("c1"), fc("c1"), fco("c1", "a"), fco("c1", "b")],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("c1")]},
                {"role": "tool", "tool_call_id": "c1", "content": "a"},
            ],
            id="repeated-call-id-kept-once",
        ),
        pytest.param(
            [fc("call_0"), fco("call_0", "one"), fc("call_0"), fco("call_0", "two")],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("call_0")]},
                {"role": "tool", "tool_call_id": "call_0", "content": "one"},
                {"role": "assistant", "content": None, "tool_calls": [call("call_0")]},
                {"role": "tool", "tool_call_id": "call_0", "content": "two"},
            ],
            id="reused-call-id-across-turns",
        ),
        pytest.param(
            [fc("c1"), fco("c1", [{"type": "input_text", "text": "chart:"}, IMAGE])],
            [
                {"role": "assistant", "content": None, "tool_calls": [call("c1")]},
                {"role": "tool", "tool_call_id": "c1", "content": "chart:"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Images returned by tool call c1:"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                        },
                    ],
                },
            ],
            id="tool-output-image-follows",
        ),
    ],
)
def test_items_to_messages(items, messages):
    assert convert(items) == messages


def test_mcp_output_truncated_like_live_tool_outputs():
    messages = items_to_messages(
        normalize_input([mcp("m", output="x" * 100)], RID), tool_output_max_bytes=10
    )
    assert messages[1]["content"].startswith("x" * 10 + "\n[output truncated")


AGENTS_HISTORY = [
    {"role": "developer", "content": "You are terse."},
    {"role": "user", "content": "What is the weather in Paris and Rome?"},
    {
        "id": "rs_a",
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "two lookups"}],
        "encrypted_content": None,
        "status": "completed",
    },
    {
        "id": "msg_a",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [
            {
                "type": "output_text",
                "text": "Checking.",
                "annotations": [
                    {
                        "type": "url_citation",
                        "url": "https://x",
                        "title": "t",
                        "start_index": 0,
                        "end_index": 1,
                    }
                ],
                "logprobs": [],
            }
        ],
    },
    mcp("mcp_a_0", name="weather", arguments='{"city":"Paris"}', output='{"c":21}'),
    {
        "id": "fc_a_1",
        "type": "function_call",
        "call_id": "call_rome",
        "name": "local_weather",
        "arguments": '{"city":"Rome"}',
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_rome", "output": '{"c":25}'},
    {
        "id": "msg_b",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [
            {"type": "output_text", "text": "Paris 21, Rome 25.", "annotations": [], "logprobs": []}
        ],
    },
    {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
]


def assert_tool_calls_answered(messages):
    """Each assistant tool_calls message is followed at once by one tool message per id."""
    answered = 0
    for k, message in enumerate(messages):
        assert message["role"] in ("system", "user", "assistant", "tool")
        calls = message.get("tool_calls") or []
        if not calls:
            continue
        assert message["role"] == "assistant"
        ids = [c["id"] for c in calls]
        assert len(set(ids)) == len(ids)
        following = messages[k + 1 : k + 1 + len(ids)]
        assert [m["role"] for m in following] == ["tool"] * len(ids)
        assert sorted(m["tool_call_id"] for m in following) == sorted(ids)
        assert all(isinstance(m["content"], str) for m in following)
        answered += len(ids)
    assert answered == sum(m["role"] == "tool" for m in messages)


def test_agents_history_round_trip():
    messages = convert(AGENTS_HISTORY)
    assert messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                call("mcp_a_0", "weather", '{"city":"Paris"}'),
                call("call_rome", "local_weather", '{"city":"Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "mcp_a_0", "content": '{"c":21}'},
        {"role": "tool", "tool_call_id": "call_rome", "content": '{"c":25}'},
        {"role": "assistant", "content": "Paris 21, Rome 25."},
        {"role": "user", "content": "Thanks"},
    ]
    assert_tool_calls_answered(messages)


# Valid items, with call ids from a small pool so repeats, orphans and late outputs all occur.
_text = st.text(max_size=8)
_call_ids = st.sampled_from(["call_0", "call_1", "call_2", "c"])
_text_part = st.builds(
    lambda t, k: {"type": k, "text": t}, _text, st.sampled_from(["input_text", "output_text"])
)
_user_part = st.one_of(_text_part, st.just(IMAGE), st.just(FILE))
_items = st.one_of(
    st.builds(
        lambda r, t: {"role": r, "content": t},
        st.sampled_from(["user", "assistant", "system", "developer"]),
        _text,
    ),
    st.builds(
        lambda ps: {"type": "message", "role": "user", "content": ps},
        st.lists(_user_part, max_size=3),
    ),
    st.builds(
        lambda ps: {"type": "message", "role": "assistant", "content": ps},
        st.lists(
            st.one_of(_text_part, st.builds(lambda t: {"type": "refusal", "refusal": t}, _text)),
            max_size=2,
        ),
    ),
    st.builds(lambda c, a: fc(c, "f", a), _call_ids, _text),
    st.builds(
        fco,
        _call_ids,
        st.one_of(_text, st.lists(st.one_of(_text_part, st.just(IMAGE)), max_size=2)),
    ),
    st.builds(lambda: {"type": "reasoning", "summary": []}),
    st.builds(
        lambda i, out, failed: mcp(
            f"mcp_{i}",
            output=None if failed else out,
            status="failed" if failed else "completed",
            error={"type": "mcp_tool_execution_error", "content": "boom"} if failed else None,
        ),
        st.integers(0, 3),
        _text,
        st.booleans(),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_items, max_size=12))
def test_items_to_messages_always_answers_every_tool_call(items):
    normalized = normalize_input(items, RID)
    messages = items_to_messages(normalized)
    assert_tool_calls_answered(messages)
    assert all(m["role"] != "developer" for m in messages)
    # Every mcp_call survives with its own answer.
    mcp_ids = {i["id"] for i in normalized if i["type"] == "mcp_call"}
    called = {c["id"] for m in messages for c in m.get("tool_calls") or []}
    assert mcp_ids <= called


# -- tools and the request body ----------------------------------------------------------------


def test_tools_to_chat():
    tools = [
        {
            "type": "function",
            "name": "a",
            "description": "d",
            "parameters": {"type": "object"},
            "strict": True,
        },
        {"type": "function", "name": "b", "description": None, "parameters": None, "strict": None},
    ]
    assert tools_to_chat(tools) == [
        {
            "type": "function",
            "function": {
                "name": "a",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "b"}},
    ]
    assert tools_to_chat(None) == []


@pytest.mark.parametrize(
    "tool", [{"type": "web_search"}, {"type": "mcp", "server_label": "x"}, "f"]
)
def test_tools_to_chat_rejects_other_types(tool):
    with pytest.raises(InvalidRequestError) as info:
        tools_to_chat([{"type": "function", "name": "a"}, tool])
    assert info.value.param == "tools[1].type"
    assert "not supported" in info.value.message


MSGS = [{"role": "user", "content": "hi"}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    ("request_body", "tools", "stream", "expected"),
    [
        pytest.param(
            {"model": "m"},
            [],
            False,
            {"model": "m", "messages": MSGS, "stream": False},
            id="minimal",
        ),
        pytest.param(
            {"model": "m", "instructions": "be nice"},
            [],
            False,
            {
                "model": "m",
                "messages": [{"role": "system", "content": "be nice"}, *MSGS],
                "stream": False,
            },
            id="instructions-first",
        ),
        pytest.param(
            {"model": "m"},
            [],
            True,
            {
                "model": "m",
                "messages": MSGS,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            id="stream",
        ),
        pytest.param(
            {
                "model": "m",
                "tool_choice": {"type": "function", "name": "f"},
                "parallel_tool_calls": False,
            },
            CHAT_TOOLS,
            False,
            {
                "model": "m",
                "messages": MSGS,
                "tools": CHAT_TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "f"}},
                "parallel_tool_calls": False,
                "stream": False,
            },
            id="tool-choice-function",
        ),
        pytest.param(
            {"model": "m", "tool_choice": "required"},
            CHAT_TOOLS,
            False,
            {
                "model": "m",
                "messages": MSGS,
                "tools": CHAT_TOOLS,
                "tool_choice": "required",
                "stream": False,
            },
            id="tool-choice-required",
        ),
        pytest.param(
            {"model": "m", "tool_choice": "required", "parallel_tool_calls": True},
            [],
            False,
            {"model": "m", "messages": MSGS, "stream": False},
            id="no-tools-no-tool-fields",
        ),
        pytest.param(
            {
                "model": "m",
                "temperature": 0.2,
                "top_p": 0.9,
                "max_output_tokens": 50,
                "top_logprobs": None,
            },
            [],
            False,
            {
                "model": "m",
                "messages": MSGS,
                "temperature": 0.2,
                "top_p": 0.9,
                "max_tokens": 50,
                "stream": False,
            },
            id="sampling",
        ),
        pytest.param(
            {
                "model": "m",
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "out",
                        "schema": {"type": "object"},
                        "strict": True,
                    }
                },
            },
            [],
            False,
            {
                "model": "m",
                "messages": MSGS,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
                },
                "stream": False,
            },
            id="json-schema",
        ),
        pytest.param(
            {"model": "m", "text": {"format": {"type": "json_object"}}},
            [],
            False,
            {
                "model": "m",
                "messages": MSGS,
                "response_format": {"type": "json_object"},
                "stream": False,
            },
            id="json-object",
        ),
        pytest.param(
            {"model": "m", "text": {"format": {"type": "text"}}, "reasoning": {"effort": "low"}},
            [],
            False,
            {"model": "m", "messages": MSGS, "reasoning_effort": "low", "stream": False},
            id="reasoning-effort",
        ),
        pytest.param(
            {
                "model": "m",
                "reasoning": {"effort": None},
                "include": [],
                "store": False,
                "metadata": {"a": "b"},
            },
            [],
            False,
            {"model": "m", "messages": MSGS, "stream": False},
            id="unknown-and-null-omitted",
        ),
    ],
)
def test_build_chat_request(request_body, tools, stream, expected):
    assert build_chat_request(request_body, MSGS, tools, stream=stream) == expected


# -- validate_request --------------------------------------------------------------------------



@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "m", "input": "hi"}, id="minimal"),
        pytest.param(
            {
                "model": "gpt-x",
                "input": [],
                "instructions": None,
                "tools": [{"type": "function", "name": "f", "parameters": {}, "strict": True}],
                "tool_choice": {"type": "function", "name": "f"},
                "temperature": 2,
                "top_p": 0,
                "max_output_tokens": 1,
                "metadata": {f"k{i}": "v" for i in range(16)},
                "previous_response_id": "resp_1",
                "store": False,
                "stream": True,
                "parallel_tool_calls": False,
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}},
                "include": [],
                "reasoning": {"effort": "high", "summary": None},
                "truncation": "disabled",
                "presence_penalty": -2,
                "frequency_penalty": 1.5,
                "top_logprobs": 20,
                "unknown_field": object(),
            },
            id="everything",
        ),
    ],
)
def test_validate_request_accepts(body):
    validate_request(body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({}, "model", id="no-model"),
        pytest.param({"model": ""}, "model", id="empty-model"),
        pytest.param({"model": 3}, "model", id="model-not-str"),
        pytest.param({"model": "m", "input": {"a": 1}}, "input", id="input-object"),
        pytest.param({"model": "m", "instructions": ["x"]}, "instructions", id="instructions"),
        pytest.param({"model": "m", "tools": {}}, "tools", id="tools-not-list"),
        pytest.param({"model": "m", "tools": [{"name": "f"}]}, "tools[0].type", id="tool-no-type"),
        pytest.param(
            {"model": "m", "tools": [{"type": "function"}]}, "tools[0].name", id="tool-no-name"
        ),
        pytest.param(
            {"model": "m", "tools": [{"type": "function", "name": "f", "parameters": "x"}]},
            "tools[0].parameters",
            id="tool-parameters",
        ),
        pytest.param({"model": "m", "tool_choice": "any"}, "tool_choice", id="tool-choice-str"),
        pytest.param(
            {"model": "m", "tool_choice": {"type": "function"}},
            "tool_choice.name",
            id="tool-choice-name",
        ),
        pytest.param(
            {"model": "m", "tool_choice": {"type": 5}}, "tool_choice", id="tool-choice-type"
        ),
        pytest.param({"model": "m", "temperature": 2.5}, "temperature", id="temperature-high"),
        pytest.param({"model": "m", "temperature": "1"}, "temperature", id="temperature-str"),
        pytest.param({"model": "m", "temperature": True}, "temperature", id="temperature-bool"),
        pytest.param({"model": "m", "top_p": -0.1}, "top_p", id="top-p"),
        pytest.param(
            {"model": "m", "max_output_tokens": 0}, "max_output_tokens", id="max-tokens-zero"
        ),
        pytest.param(
            {"model": "m", "max_output_tokens": 1.5}, "max_output_tokens", id="max-tokens-float"
        ),
        pytest.param({"model": "m", "metadata": []}, "metadata", id="metadata-list"),
        pytest.param(
            {"model": "m", "metadata": {f"k{i}": "v" for i in range(17)}},
            "metadata",
            id="metadata-17",
        ),
        pytest.param({"model": "m", "metadata": {"a": 1}}, "metadata.a", id="metadata-value"),
        pytest.param(
            {"model": "m", "metadata": {"k" * 65: "v"}}, "metadata", id="metadata-key-long"
        ),
        pytest.param(
            {"model": "m", "previous_response_id": 1}, "previous_response_id", id="previous-id"
        ),
        pytest.param({"model": "m", "store": "yes"}, "store", id="store"),
        pytest.param({"model": "m", "stream": 1}, "stream", id="stream"),
        pytest.param(
            {"model": "m", "parallel_tool_calls": "no"}, "parallel_tool_calls", id="parallel"
        ),
        pytest.param({"model": "m", "text": "json"}, "text", id="text"),
        pytest.param(
            {"model": "m", "text": {"format": {"type": "xml"}}},
            "text.format.type",
            id="format-type",
        ),
        pytest.param(
            {"model": "m", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name",
            id="format-name",
        ),
        pytest.param(
            {"model": "m", "text": {"format": {"type": "json_schema", "name": "x", "schema": []}}},
            "text.format.schema",
            id="format-schema",
        ),
        pytest.param({"model": "m", "include": "x"}, "include", id="include-str"),
        pytest.param({"model": "m", "include": [1]}, "include", id="include-ints"),
        pytest.param(
            {"model": "m", "reasoning": {"effort": 1}}, "reasoning.effort", id="reasoning-effort"
        ),
        pytest.param({"model": "m", "truncation": "middle"}, "truncation", id="truncation"),
        pytest.param(
            {"model": "m", "tools": [{"type": "mcp"}]}, "tools[0].server_label", id="mcp-tool-label"
        ),
        pytest.param(
            {"model": "m", "reasoning": {"summary": []}}, "reasoning.summary", id="reasoning-summary"
        ),
        pytest.param(
            {"model": "m", "text": {"verbosity": 3}}, "text.verbosity", id="text-verbosity"
        ),
        pytest.param(
            {"model": "m", "text": {"format": {"type": "json_schema", "name": "x", "schema": {},
                                               "description": 1}}},
            "text.format.description",
            id="format-description",
        ),
        pytest.param({"model": "m", "presence_penalty": 3}, "presence_penalty", id="presence"),
        pytest.param({"model": "m", "frequency_penalty": "0"}, "frequency_penalty", id="frequency"),
        pytest.param({"model": "m", "top_logprobs": 21}, "top_logprobs", id="top-logprobs-high"),
        pytest.param({"model": "m", "top_logprobs": 1.0}, "top_logprobs", id="top-logprobs-float"),
    ],
)
def test_validate_request_errors(body, param):
    with pytest.raises(InvalidRequestError) as info:
        validate_request(body)
    assert info.value.param == param
    assert info.value.to_dict()["error"]["type"] == "invalid_request_error"


# -- validate_call_outputs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "items"),
    [
        pytest.param([], [user("hi")], id="no-outputs"),
        pytest.param([fc("c1")], [fco("c1")], id="call-in-history"),
        pytest.param([], [fc("c1"), fco("c1")], id="call-earlier-in-input"),
        pytest.param([mcp("mcp_1")], [fco("mcp_1")], id="mcp-call-by-id"),
        pytest.param([{**mcp("mcp_1"), "call_id": "c7"}], [fco("c7")], id="mcp-call-by-call-id"),
        pytest.param([fc("c1")], [fco("c1"), fco("c1")], id="answered-twice"),
    ],
)
def test_validate_call_outputs_accepts(history, items):
    validate_call_outputs(normalize_input(history, RID), normalize_input(items, RID))


@pytest.mark.parametrize(
    ("history", "items", "param"),
    [
        pytest.param([], [fco("c9")], "input[0].call_id", id="never-asked"),
        pytest.param([fc("c1")], [user("x"), fco("c2")], "input[1].call_id", id="other-call-id"),
        pytest.param([], [fco("c1"), fc("c1")], "input[0].call_id", id="call-after-output"),
        pytest.param([fco("c1")], [fco("c1")], "input[0].call_id", id="only-an-output-before"),
    ],
)
def test_validate_call_outputs_rejects(history, items, param):
    with pytest.raises(InvalidRequestError) as info:
        validate_call_outputs(normalize_input(history, RID), normalize_input(items, RID))
    assert info.value.param == param
    assert info.value.status_code == 400
    assert info.value.message.startswith("No tool call found for function call output with call_id")


# -- usage -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chat", "expected"),
    [
        pytest.param(None, zero_usage(), id="none"),
        pytest.param(
            {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            {**zero_usage(), "input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
            id="plain",
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
            {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": 3},
                "total_tokens": 15,
            },
            id="details-and-computed-total",
        ),
        pytest.param(
            {"prompt_tokens": 1, "completion_tokens": None, "prompt_tokens_details": None},
            {**zero_usage(), "input_tokens": 1, "total_tokens": 1},
            id="nulls",
        ),
    ],
)
def test_chat_usage_to_response_usage(chat, expected):
    assert chat_usage_to_response_usage(chat) == expected


def test_usage_sums():
    a = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}
    b = {
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    total = add_chat_usage(add_chat_usage(None, a), b)
    assert total == {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 17,
    }
    assert add_usage(total, None) == total
    assert chat_usage_to_response_usage(total) == total  # Responses-shaped usage passes through


# -- the Response object -----------------------------------------------------------------------

RESPONSE_KEYS = {
    "id", "object", "created_at", "completed_at", "status", "error", "incomplete_details", "model",
    "output", "instructions", "metadata", "parallel_tool_calls", "temperature", "top_p",
    "tool_choice", "tools", "previous_response_id", "store", "background", "max_output_tokens",
    "max_tool_calls", "text", "truncation", "reasoning", "user", "service_tier",
    "presence_penalty", "frequency_penalty", "top_logprobs", "safety_identifier",
    "prompt_cache_key", "usage", "conversation", "prompt_cache_retention",
}  # fmt: skip


@pytest.mark.parametrize(
    "request_body",
    [
        pytest.param({"model": "m", "input": "hi"}, id="defaults"),
        pytest.param(
            {
                "model": "m",
                "input": "hi",
                "instructions": "be nice",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "f"},
                "parallel_tool_calls": False,
                "temperature": 0.5,
                "top_p": 0.5,
                "max_output_tokens": 10,
                "max_tool_calls": 3,
                "text": {
                    "format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}
                },
                "reasoning": {"effort": "low"},
                "store": False,
                "metadata": {"a": "b"},
                "previous_response_id": "resp_0",
                "user": "u",
                "truncation": "auto",
            },
            id="everything-echoed",
        ),
    ],
)
def test_response_object_validates(request_body):
    output = [out_msg("hi", "msg_1")]
    obj = response_object(
        id="resp_1",
        created_at=1700000000.7,
        model="m",
        request=request_body,
        status="completed",
        output=output,
        usage=add_chat_usage(None, {"prompt_tokens": 1, "completion_tokens": 2}),
        completed_at=1700000001.2,
    )
    assert set(obj) == RESPONSE_KEYS
    assert obj["created_at"] == 1700000000 and obj["completed_at"] == 1700000001
    assert obj["object"] == "response" and obj["output"] is output
    parsed = Response.model_validate(obj)
    assert parsed.output_text == "hi"
    assert parsed.usage.total_tokens == 3
    for key in (
        "instructions",
        "temperature",
        "max_output_tokens",
        "metadata",
        "store",
        "truncation",
    ):
        if key in request_body:
            assert obj[key] == request_body[key]
    if "temperature" not in request_body:
        # OpenAI's values when the request set none: never null where OpenAI gives a value.
        assert (obj["temperature"], obj["top_p"]) == (1.0, 1.0)
        assert obj["text"] == {"format": {"type": "text"}, "verbosity": "medium"}
        assert obj["reasoning"] == {"effort": None, "summary": None}
        assert (obj["service_tier"], obj["top_logprobs"], obj["metadata"]) == ("default", 0, {})
    if "tools" in request_body:
        assert obj["tools"] == [
            {
                "type": "function",
                "name": "f",
                "description": None,
                "parameters": None,
                "strict": None,
            }
        ]


def test_response_object_failed_and_incomplete_validate():
    for status, extra in (
        ("failed", {"error": {"code": "server_error", "message": "boom"}}),
        ("incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}),
        ("in_progress", {}),
    ):
        obj = response_object(
            id="resp_1",
            created_at=1.0,
            model="m",
            request={"model": "m"},
            status=status,
            output=[],
            usage=None,
            **extra,
        )
        assert Response.model_validate(obj).status == status
