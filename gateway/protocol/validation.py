"""Request-level checks of a ``POST /v1/responses`` body, before anything is written.

* ``validate_request`` — type checks of the top-level fields the gateway reads (and echoes);
* ``validate_call_outputs`` — every ``function_call_output`` in new input answers an earlier call.

Each problem raises :class:`gateway.errors.InvalidRequestError` with ``param`` naming the field
the way OpenAI does (``text.format.schema``, ``input[3].call_id``). Input items themselves are
checked by :func:`gateway.protocol.convert.normalize_input`.
"""

from __future__ import annotations

from typing import Any

from executors.mcp_tool import option_problem
from gateway.errors import InvalidRequestError

from .checks import (
    STRING_FIELDS,
    bad_value,
    is_int,
    is_number,
    is_str,
    unsupported_value,
)

__all__ = ["validate_call_outputs", "validate_request"]


def validate_request(body: dict[str, Any]) -> None:
    """Type-check the top-level fields of a ``POST /v1/responses`` body that the gateway reads.

    Null means absent for every optional field; unknown fields are ignored. Input items are
    checked by :func:`normalize_input`. Raises InvalidRequestError with ``param`` naming the field
    (``model``, ``temperature``, ``metadata``, ``text.format.schema``, ``tools[1].name``, …).
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_value("model", "a non-empty string")
    if "\x00" in model:
        raise bad_value("model", "a model name without NUL characters")
    if "input" in body and not isinstance(body["input"], (str, list)):
        raise bad_value("input", "a string or a list of input items")
    if body.keys().isdisjoint(_CHECKED):
        return  # only model and input (the usual shape): nothing below applies
    get = body.get
    for key in STRING_FIELDS:
        if get(key) is not None and not isinstance(get(key), str):
            raise bad_value(key, "a string")
    for key in ("store", "stream", "parallel_tool_calls", "background"):
        if get(key) is not None and not isinstance(get(key), bool):
            raise bad_value(key, "a boolean")
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = get(key)
        if value is not None and not (is_number(value) and low <= value <= high):
            raise bad_value(key, f"a number from {low} to {high}")
    for key in ("presence_penalty", "frequency_penalty"):
        value = get(key)
        if value is not None and not (is_number(value) and -2 <= value <= 2):
            raise bad_value(key, "a number from -2 to 2")
    for key in ("max_output_tokens", "max_tool_calls"):
        value = get(key)
        if value is not None and not (is_int(value) and value >= 1):
            raise bad_value(key, "an integer of at least 1")
    top_logprobs = get("top_logprobs")
    if top_logprobs is not None and not (is_int(top_logprobs) and 0 <= top_logprobs <= 20):
        raise bad_value("top_logprobs", "an integer from 0 to 20")
    if get("truncation") is not None and get("truncation") not in ("auto", "disabled"):
        raise bad_value("truncation", "'auto' or 'disabled'")
    _validate_metadata(get("metadata"))
    _validate_tools(get("tools"))
    _validate_tool_choice(get("tool_choice"))
    _validate_text(get("text"))
    reasoning = get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise bad_value("reasoning", "an object")
        for key in ("effort", "summary", "generate_summary"):
            if reasoning.get(key) is not None and not isinstance(reasoning[key], str):
                raise bad_value(f"reasoning.{key}", "a string")
    include = get("include")
    if include is not None and not (isinstance(include, list) and all(map(is_str, include))):
        raise bad_value("include", "a list of strings")


# Every field checked below ``model`` and ``input`` in validate_request: a body with none of
# them (present at all, null included) passes those checks as it is.
_CHECKED = frozenset(
    (
        *STRING_FIELDS,
        "store", "stream", "parallel_tool_calls", "background", "temperature", "top_p",
        "presence_penalty", "frequency_penalty", "max_output_tokens", "max_tool_calls",
        "top_logprobs", "truncation", "metadata", "tools", "tool_choice", "text", "reasoning",
        "include",
    )
)  # fmt: skip


def _validate_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise bad_value("metadata", "an object of string keys and string values")
    if len(metadata) > 16:
        raise bad_value("metadata", "at most 16 keys")
    for key, value in metadata.items():
        if len(key) > 64:
            raise bad_value("metadata", "keys of at most 64 characters")
        if not isinstance(value, str) or len(value) > 512:
            raise bad_value(f"metadata.{key}", "a string of at most 512 characters")


def _validate_mcp_tool(tool: dict[str, Any], param: str) -> None:
    """OpenAI's ``Mcp`` tool: a remote server (``server_url``) or a registered one (its label)."""
    for key in ("connector_id", "tunnel_id"):
        if tool.get(key) is not None:
            raise unsupported_value(
                f"{param}.{key}",
                f"MCP {key} is not supported by this gateway; give server_url, or the "
                "server_label of an MCP server registered on the gateway.",
            )
    problem = option_problem(tool)
    if problem is not None:
        raise bad_value(f"{param}.{problem[0]}", problem[1])


def _validate_tools(tools: Any) -> None:
    """``function``, ``custom`` and ``namespace`` tools are checked in full; other (hosted)
    types only need a string ``type``: they are mapped or left out, never refused (see
    :mod:`gateway.protocol.tools`). ``mcp`` tools: see :func:`_validate_mcp_tool`."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad_value("tools", "a list of tools")
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_value(param, "an object")
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise bad_value(f"{param}.type", "a string")
        if kind in ("function", "custom"):
            _validate_tool(tool, param)
        elif kind == "namespace":
            _require_name(tool, param)
            if tool.get("description") is not None and not isinstance(tool["description"], str):
                raise bad_value(f"{param}.description", "a string")
            members = tool.get("tools")
            if not isinstance(members, list) or not members:
                raise bad_value(f"{param}.tools", "a non-empty list of function or custom tools")
            for j, member in enumerate(members):
                where = f"{param}.tools[{j}]"
                if not isinstance(member, dict) or member.get("type") not in ("function", "custom"):
                    raise bad_value(where, "a function or custom tool")
                _validate_tool(member, where)
        elif kind == "mcp":
            _validate_mcp_tool(tool, param)


def _require_name(tool: dict[str, Any], param: str) -> None:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise bad_value(f"{param}.name", "a non-empty string")


def _validate_tool(tool: dict[str, Any], param: str) -> None:
    """One ``function`` or ``custom`` tool (at the top level or in a namespace)."""
    _require_name(tool, param)
    if tool.get("description") is not None and not isinstance(tool["description"], str):
        raise bad_value(f"{param}.description", "a string")
    if tool["type"] == "function":
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise bad_value(f"{param}.parameters", "a JSON Schema object")
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise bad_value(f"{param}.strict", "a boolean")
        return
    fmt = tool.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "grammar"):
        raise bad_value(f"{param}.format", "a text or grammar format")
    if fmt["type"] == "grammar":
        if fmt.get("syntax") not in ("lark", "regex"):
            raise bad_value(f"{param}.format.syntax", "'lark' or 'regex'")
        if not isinstance(fmt.get("definition"), str):
            raise bad_value(f"{param}.format.definition", "a string")


def _validate_tool_choice(choice: Any) -> None:
    if choice is None or choice in ("none", "auto", "required"):
        return
    if isinstance(choice, dict) and isinstance(choice.get("type"), str):
        if choice["type"] in ("function", "custom"):
            if not isinstance(choice.get("name"), str) or not choice["name"]:
                raise bad_value("tool_choice.name", "a non-empty string")
        elif choice["type"] == "allowed_tools":
            if choice.get("mode") not in ("auto", "required"):
                raise bad_value("tool_choice.mode", "'auto' or 'required'")
        return  # a hosted tool type: mapped or left out like the tool itself
    raise bad_value("tool_choice", "'none', 'auto', 'required' or a tool choice object")


def _validate_text(text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise bad_value("text", "an object")
    if text.get("verbosity") is not None and not isinstance(text["verbosity"], str):
        raise bad_value("text.verbosity", "a string")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise bad_value("text.format", "an object")
    kind = fmt.get("type")
    if kind not in ("text", "json_schema", "json_object"):
        raise bad_value("text.format.type", "'text', 'json_schema' or 'json_object'")
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise bad_value("text.format.name", "a non-empty string")
        if fmt.get("description") is not None and not isinstance(fmt["description"], str):
            raise bad_value("text.format.description", "a string")
        if not isinstance(fmt.get("schema"), dict):
            raise bad_value("text.format.schema", "a JSON Schema object")
        if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
            raise bad_value("text.format.strict", "a boolean")


def validate_call_outputs(history: list[dict[str, Any]], input_items: list[dict[str, Any]]) -> None:
    """Reject a ``function_call_output`` in the new input that answers no earlier tool call.

    Earlier calls are function and custom tool calls (by ``call_id``) and ``mcp_call`` items (by
    ``call_id`` or ``id``) in ``history`` or earlier in ``input_items``. Raises
    InvalidRequestError with ``param`` ``input[i].call_id``.
    """
    known: set[str] = set()
    for item in history:
        _note_call(item, known)
    for i, item in enumerate(input_items):
        kind = item.get("type")
        if kind in ("function_call_output", "custom_tool_call_output") and item.get(
            "call_id"
        ) not in known:
            raise InvalidRequestError(
                f"No tool call found for function call output with call_id {item.get('call_id')}.",
                param=f"input[{i}].call_id",
            )
        _note_call(item, known)


def _note_call(item: dict[str, Any], known: set[str]) -> None:
    kind = item.get("type")
    if kind in ("function_call", "custom_tool_call") and item.get("call_id"):
        known.add(item["call_id"])
    elif kind == "mcp_call":
        known.add(item.get("call_id") or item.get("id") or "")
