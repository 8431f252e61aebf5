"""The tool types real clients send, planned for a Chat Completions upstream (pure functions)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidRequestError
from gateway.protocol.convert import build_chat_request, items_to_messages, normalize_input
from gateway.protocol.tools import custom_arguments, custom_input, plan_tools
from gateway.protocol.validation import validate_request

GRAMMAR = {"type": "grammar", "syntax": "lark", "definition": 'start: "x"+'}
names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)


def test_plan_flattens_custom_namespace_and_hosted_tools():
    tools = [
        {"type": "function", "name": "f", "parameters": {"type": "object"}},
        {"type": "custom", "name": "apply_patch", "description": "Patch.", "format": GRAMMAR},
        {"type": "namespace", "name": "crm", "description": "CRM", "tools": [
            {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
            {"type": "custom", "name": "note"},
        ]},
        {"type": "web_search"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "web_search_preview"},
    ]
    plan = plan_tools(tools, {"file_search": "docs"})
    assert [f["name"] for f in plan.functions] == ["f", "apply_patch", "crm__lookup", "crm__note", "docs"]
    patch = plan.functions[1]
    assert patch["parameters"]["required"] == ["input"]
    assert "Patch." in patch["description"] and 'start: "x"+' in patch["description"]
    assert plan.client["crm__lookup"].namespace == "crm"
    assert plan.client["crm__note"].kind == "custom"
    assert plan.left_out == ["web_search", "web_search_preview"]
    assert plan.mapped == {"file_search": "docs"}
    assert plan.upstream_name("lookup", "crm") == "crm__lookup"
    assert plan.upstream_name("f", None) == "f"


def test_flat_names_never_collide_with_plain_names():
    tools = [
        {"type": "function", "name": "a__b"},
        {"type": "namespace", "name": "a", "tools": [{"type": "function", "name": "b"}]},
    ]
    plan = plan_tools(tools)
    assert [f["name"] for f in plan.functions] == ["a__b", "a__b_2"]
    assert plan.upstream_name("b", "a") == "a__b_2"


@given(st.lists(st.tuples(names, st.lists(names, min_size=1, max_size=4)), max_size=5),
       st.lists(names, max_size=5))
def test_upstream_names_are_unique_and_map_back(namespaces, plain):
    tools = [{"type": "function", "name": n} for n in dict.fromkeys(plain)]
    for namespace, members in namespaces:
        tools.append({"type": "namespace", "name": namespace,
                      "tools": [{"type": "function", "name": m} for m in dict.fromkeys(members)]})
    plan = plan_tools(tools)
    upstream = [f["name"] for f in plan.functions]
    assert len(upstream) == len(set(upstream))
    assert all(len(name) <= 64 for name in upstream)
    for name, tool in plan.client.items():
        assert plan.upstream_name(tool.name, tool.namespace) == name


@given(st.text())
def test_custom_input_round_trips(text):
    assert custom_input(custom_arguments(text)) == text


def test_custom_input_of_odd_arguments():
    assert custom_input("not json") == "not json"
    assert custom_input('"just a string"') == "just a string"
    assert custom_input('{"other": 1}') == '{"other": 1}'


def test_items_of_custom_and_namespaced_calls_go_upstream_under_their_flat_names():
    plan = plan_tools([
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "crm", "tools": [{"type": "function", "name": "lookup"}]},
    ])
    items = normalize_input([
        {"role": "user", "content": "go"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "role": "assistant", "phase": "commentary", "content": "On it."},
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** x"},
        {"type": "function_call", "call_id": "c2", "name": "lookup", "namespace": "crm",
         "arguments": "{}"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"},
        {"type": "function_call_output", "call_id": "c2", "output": "found"},
    ], "resp_ab")
    assert items[3]["id"] == "ctc_ab_3" and items[5]["id"] == "ctco_ab_5"
    reasoning = lambda item: "hm"  # noqa: E731
    messages = items_to_messages(items, tool_name=plan.upstream_name, reasoning_text=reasoning)
    assert messages[1]["reasoning_content"] == "hm" and messages[1]["content"] == "On it."
    calls = messages[1]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["apply_patch", "crm__lookup"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"input": "*** x"}
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "tool", "tool_call_id": "c2", "content": "found"},
    ]
    assert "reasoning_content" not in items_to_messages(items)[1]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "custom", "name": "apply_patch"}, {"type": "function", "function": {"name": "apply_patch"}}),
        ({"type": "function", "name": "lookup", "namespace": "crm"},
         {"type": "function", "function": {"name": "crm__lookup"}}),
        ({"type": "allowed_tools", "mode": "required", "tools": []}, "required"),
        ({"type": "web_search"}, "auto"),
    ],
)
def test_tool_choice_for_the_upstream(choice, expected):
    plan = plan_tools([
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "crm", "tools": [{"type": "function", "name": "lookup"}]},
    ])
    validate_request({"model": "m", "tool_choice": choice})
    body = build_chat_request(
        {"model": "m", "tool_choice": choice}, [], [{"type": "function", "function": {"name": "x"}}],
        stream=False, tool_name=plan.upstream_name,
    )
    assert body["tool_choice"] == expected


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "custom"}], "tools[0].name"),
        ([{"type": "custom", "name": "p", "format": {"type": "grammar", "syntax": "ebnf",
                                                     "definition": "x"}}], "tools[0].format.syntax"),
        ([{"type": "custom", "name": "p", "format": {"type": "grammar", "syntax": "lark"}}],
         "tools[0].format.definition"),
        ([{"type": "namespace", "name": "n", "tools": []}], "tools[0].tools"),
        ([{"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}], "tools[0].tools[0]"),
        ([{"type": "namespace", "name": "n", "tools": [{"type": "function"}]}],
         "tools[0].tools[0].name"),
        ([{"type": "mcp", "server_label": "x", "connector_id": "connector_gmail"}],
         "tools[0].connector_id"),
        ([{"type": "mcp", "server_label": "a b", "server_url": "http://h/mcp"}],
         "tools[0].server_label"),
    ],
)
def test_bad_tools_are_400s_naming_the_param(tools, param):
    with pytest.raises(InvalidRequestError) as info:
        validate_request({"model": "m", "tools": tools})
    assert info.value.param == param


def test_hosted_types_pass_validation():
    tools = [{"type": kind} for kind in (
        "web_search", "web_search_preview", "file_search", "code_interpreter",
        "image_generation", "computer_use_preview", "local_shell", "shell", "apply_patch",
    )]
    validate_request({"model": "m", "tools": tools})


@given(st.text(), st.booleans(), st.lists(st.integers(1, 9), min_size=1, max_size=50))
def test_custom_input_decodes_while_it_streams(text, ascii_only, sizes):
    from gateway.protocol.tools import CustomInputDecoder

    arguments = json.dumps({"input": text}, ensure_ascii=ascii_only)
    decoder, out, i = CustomInputDecoder(), [], 0
    while i < len(arguments):
        size = sizes[len(out) % len(sizes)]
        out.append(decoder.feed(arguments[i : i + size]))
        i += size
    assert "".join(out) == text


def test_custom_input_decoder_gives_up_on_other_shapes():
    from gateway.protocol.tools import CustomInputDecoder

    for arguments in ('{"other": 1, "input": "x"}', '"plain"', "[1]", "not json"):
        decoder = CustomInputDecoder()
        assert "".join(decoder.feed(c) for c in arguments) == ""
