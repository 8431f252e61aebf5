"""Responses API requests → Chat Completions requests.

Pure functions, no I/O. The mapping follows ``shared/reference/responses-api.md`` ("Mapping to
Chat Completions"):

* ``normalize_input`` — the request's ``input`` as a list of Responses input items, validated,
  each with a stable ``id`` (the client's, or ``<prefix>_<response-hex>_<position>``);
* ``items_to_messages`` — input items (and earlier output items) → Chat Completions messages;
* ``tools_to_chat`` / ``build_chat_request`` — tools and the whole upstream body;
* request-level checks (``validate_request``, ``validate_call_outputs``) are in
  :mod:`gateway.protocol.validation`;
* token accounting is in :mod:`gateway.protocol.usage`.

Every problem with the client's request raises :class:`gateway.errors.InvalidRequestError` with
``param`` naming the offending field the way OpenAI does (``input[2].content[0].text``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .checks import bad_value, unsupported_value
from .tools import custom_arguments
from .truncation import tool_output_text, truncate_for_model

__all__ = ["build_chat_request", "items_to_messages", "normalize_input", "tools_to_chat"]

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text")
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "max_output_tokens": "max_tokens"}
_ID_PREFIX = {
    "message": "msg", "function_call": "fc", "function_call_output": "fco",
    "reasoning": "rs", "mcp_call": "mcp", "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco", "compaction": "cmp", "mcp_list_tools": "mcpl",
    "mcp_approval_request": "mcpr", "mcp_approval_response": "mcpa",
}  # fmt: skip
_CALLS = ("function_call", "custom_tool_call", "mcp_call")
_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def _hex(response_id: str) -> str:
    return response_id.split("_", 1)[1] if "_" in response_id else response_id


# -- input items ------------------------------------------------------------------------------


def normalize_input(input: str | list[Any], response_id: str) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of Responses input items, each with an ``id``.

    A string becomes one user ``message`` with an ``input_text`` part. Messages get
    ``"type": "message"`` and ``"status": "completed"`` when missing, and string content becomes one
    ``input_text`` part (``output_text`` with ``annotations: []`` for the assistant). Items without
    an ``id`` get ``<prefix>_<response-id hex>_<position>`` (``msg``, ``fc``, ``fco``, ``rs``,
    ``mcp``), so listing the same stored request always gives the same ids. The client's dicts
    are not modified.

    ``item_reference`` items (``{"type": "item_reference", "id"}``) are kept as they are; the
    service resolves them to the stored items they name.

    Raises InvalidRequestError (param ``input``, ``input[i].role``, ``input[i].content[j].type``,
    …) for malformed items and for item kinds this gateway cannot send to a Chat Completions
    upstream (``file_id`` images and files, OpenAI-hosted tool calls).
    """
    hex_id = _hex(response_id)
    if isinstance(input, str):
        return [
            {
                "type": "message",
                "id": f"msg_{hex_id}_0",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": input}],
            }
        ]
    if not isinstance(input, list):
        raise bad_value("input", "a string or a list of input items")
    items = []
    for i, raw in enumerate(input):
        param = f"input[{i}]"
        if not isinstance(raw, dict):
            raise bad_value(param, "an object")
        item = dict(raw)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = item["type"] = "message"
        if not isinstance(kind, str):
            raise bad_value(f"{param}.type", "a string")
        validator = _ITEM_VALIDATORS.get(kind)
        if validator is None:
            message = f"Input items of type '{kind}' are not supported by this gateway."
            raise unsupported_value(f"{param}.type", message)
        validator(item, param)
        if kind == "item_reference":
            _require_str(item, "id", param)
        elif "id" not in item or item["id"] is None:
            item["id"] = f"{_ID_PREFIX[kind]}_{hex_id}_{i}"
        else:
            _require_str(item, "id", param)
            if "\x00" in item["id"]:
                raise bad_value(f"{param}.id", "an id without NUL characters")
        items.append(item)
    return items


def _require_str(item: dict[str, Any], key: str, param: str, *, empty: bool = False) -> None:
    value = item.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise bad_value(f"{param}.{key}", "a string" if empty else "a non-empty string")


def _validate_message(item: dict[str, Any], param: str) -> None:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_value(f"{param}.role", f"one of {', '.join(_ROLES)}")
    if item.get("phase") is not None and item["phase"] not in ("commentary", "final_answer"):
        raise bad_value(f"{param}.phase", "'commentary' or 'final_answer'")
    item.setdefault("status", "completed")
    content = item.get("content")
    if isinstance(content, str):
        if role == "assistant":
            item["content"] = [{"type": "output_text", "text": content, "annotations": []}]
        else:
            item["content"] = [{"type": "input_text", "text": content}]
        return
    if not isinstance(content, list):
        raise bad_value(f"{param}.content", "a string or a list of content parts")
    for j, part in enumerate(content):
        _validate_part(part, f"{param}.content[{j}]", media=role == "user")


def _validate_part(part: Any, param: str, *, media: bool) -> None:
    """One content part of a message (``media``: images and files allowed) or a tool output."""
    if not isinstance(part, dict):
        raise bad_value(param, "an object")
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        _require_str(part, "text", param, empty=True)
    elif kind == "refusal":
        _require_str(part, "refusal", param, empty=True)
    elif kind in ("input_image", "input_file") and not media:
        raise bad_value(f"{param}.type", "a text part: images and files go in user messages")
    elif kind == "input_image":
        if part.get("file_id") is not None:
            raise unsupported_value(
                f"{param}.file_id",
                "Images given by 'file_id' are not supported by this gateway; use 'image_url'.",
            )
        _require_str(part, "image_url", param)
        if part.get("detail") not in (None, "auto", "low", "high", "original"):
            raise bad_value(f"{param}.detail", "auto, low, high or original")
    elif kind == "input_file":
        for key in ("file_id", "file_url"):
            if part.get(key) is not None:
                raise unsupported_value(
                    f"{param}.{key}",
                    f"Files given by '{key}' are not supported by this gateway; use 'file_data'.",
                )
        _require_str(part, "file_data", param)
        if part.get("filename") is not None:
            _require_str(part, "filename", param)
    else:
        raise unsupported_value(
            f"{param}.type", f"Content parts of type '{kind}' are not supported by this gateway."
        )


def _validate_function_call(item: dict[str, Any], param: str) -> None:
    _require_str(item, "call_id", param)
    _require_str(item, "name", param)
    _require_str(item, "arguments", param, empty=True)
    item.setdefault("status", "completed")


def _validate_custom_tool_call(item: dict[str, Any], param: str) -> None:
    _require_str(item, "call_id", param)
    _require_str(item, "name", param)
    _require_str(item, "input", param, empty=True)
    if item.get("namespace") is not None:
        _require_str(item, "namespace", param)
    item.setdefault("status", "completed")


def _validate_function_call_output(item: dict[str, Any], param: str) -> None:
    _require_str(item, "call_id", param)
    output = item.get("output")
    if isinstance(output, list):
        for j, part in enumerate(output):
            _validate_part(part, f"{param}.output[{j}]", media=True)
    elif not isinstance(output, str):
        raise bad_value(f"{param}.output", "a string or a list of content parts")
    item.setdefault("status", "completed")


def _validate_reasoning(item: dict[str, Any], param: str) -> None:
    # Only the shape clients resend is checked; encrypted_content is opened by the service.
    for key in ("summary", "content"):
        if item.get(key) is not None and not isinstance(item[key], list):
            raise bad_value(f"{param}.{key}", "a list")
    if item.get("encrypted_content") is not None:
        _require_str(item, "encrypted_content", param)


def _validate_mcp_call(item: dict[str, Any], param: str) -> None:
    if item.get("call_id") is not None:
        _require_str(item, "call_id", param)  # it becomes a tool-call id: a dict key
    _require_str(item, "name", param)
    _require_str(item, "arguments", param, empty=True)
    if item.get("output") is not None and not isinstance(item["output"], str):
        raise bad_value(f"{param}.output", "a string or null")


def _validate_mcp_list_tools(item: dict[str, Any], param: str) -> None:
    # Resent by clients that keep the conversation themselves; its tools are reused.
    _require_str(item, "server_label", param)
    if not isinstance(item.get("tools"), list) or not all(isinstance(t, dict) for t in item["tools"]):
        raise bad_value(f"{param}.tools", "a list of tools")


def _validate_mcp_approval_request(item: dict[str, Any], param: str) -> None:
    _require_str(item, "id", param)
    _require_str(item, "server_label", param)
    _require_str(item, "name", param)
    _require_str(item, "arguments", param, empty=True)


def _validate_mcp_approval_response(item: dict[str, Any], param: str) -> None:
    _require_str(item, "approval_request_id", param)
    if not isinstance(item.get("approve"), bool):
        raise bad_value(f"{param}.approve", "a boolean")
    if item.get("reason") is not None and not isinstance(item["reason"], str):
        raise bad_value(f"{param}.reason", "a string")


def _validate_compaction(item: dict[str, Any], param: str) -> None:
    # Opened (and expanded to its summary) by the service, which holds the key.
    _require_str(item, "encrypted_content", param)


def _validate_reference(item: dict[str, Any], param: str) -> None:
    pass  # the id is checked by normalize_input, resolved by the service


_ITEM_VALIDATORS = {
    "message": _validate_message,
    "function_call": _validate_function_call,
    "function_call_output": _validate_function_call_output,
    "custom_tool_call": _validate_custom_tool_call,
    "custom_tool_call_output": _validate_function_call_output,
    "reasoning": _validate_reasoning,
    "mcp_call": _validate_mcp_call,
    "mcp_list_tools": _validate_mcp_list_tools,
    "mcp_approval_request": _validate_mcp_approval_request,
    "mcp_approval_response": _validate_mcp_approval_response,
    "item_reference": _validate_reference,
    "compaction": _validate_compaction,
}


# -- items → Chat Completions messages ---------------------------------------------------------


def items_to_messages(
    items: list[dict[str, Any]],
    *,
    tool_output_max_bytes: int = 50_000,
    tool_output_max_lines: int = 2_000,
    tool_name: Callable[[str, str | None], str] | None = None,
    reasoning_text: Callable[[dict[str, Any]], str | None] | None = None,
) -> list[dict[str, Any]]:
    """Normalized Responses items (see :func:`normalize_input`) → Chat Completions messages.

    * ``message`` → a message of the same role, ``developer`` → ``system`` (many upstreams do
      not know ``developer``); all-text content is sent as one string (parts joined by ``\\n``;
      refusals become text), otherwise as ``text`` / ``image_url`` / ``file`` parts;
    * consecutive ``function_call``, ``custom_tool_call`` and ``mcp_call`` items → one assistant
      message with ``tool_calls``, merged into the assistant message right before them if there
      is one; reasoning items in between never split a turn;
    * right after that assistant message comes one ``tool`` message per call: a
      ``function_call_output``'s / ``custom_tool_call_output``'s output (found anywhere later in
      ``items``), or an ``mcp_call``'s own output (``"Error: …"`` if it failed), truncated like
      live tool outputs;
    * the tool-call id of a function or custom call is its ``call_id``; of an ``mcp_call`` its
      ``call_id`` if it carries one, else its ``id`` (the gateway's own ``mcp_…`` items have
      none); a call's function name is ``tool_name(name, namespace)`` (the upstream name of a
      namespaced or custom tool, see :mod:`gateway.protocol.tools`), a custom call's arguments
      ``{"input": <its input>}``;
    * ``reasoning`` items are dropped, unless ``reasoning_text`` is given: then the text it
      returns for them (None: nothing) goes to the next assistant message as
      ``reasoning_content``.
    * ``mcp_list_tools`` and ``mcp_approval_*`` items are dropped (an approved call becomes an
      ``mcp_call`` item of the response that ran it).

    Chat upstreams reject an assistant ``tool_calls`` message that is not followed by exactly one
    tool message per id, so history that breaks that rule is repaired, never sent as is: a call
    with no later output is dropped, an output with no earlier call is dropped, and a repeated
    ``call_id`` within one assistant message is kept once. Images in tool outputs (which ``tool``
    messages cannot carry) follow the tool messages as one user message.
    Never raises for items that :func:`normalize_input` accepted.
    """
    outputs: dict[str, list[int]] = {}
    for position, item in enumerate(items):
        if item.get("type") in _OUTPUTS:
            outputs.setdefault(item["call_id"], []).append(position)
    claimed: set[int] = set()
    messages: list[dict[str, Any]] = []
    turn = _Turn(
        outputs, claimed, messages, (tool_output_max_bytes, tool_output_max_lines),
        tool_name or _plain_name, reasoning_text,
    )
    i, n = 0, len(items)
    while i < n:
        item = items[i]
        kind = item.get("type")
        if kind == "message":
            message = _message(item)
            if item["role"] == "assistant":
                turn.take_reasoning(message)
                if _next_call(items, i + 1) is not None:
                    i = turn.calls(items, i + 1, message)
                    continue
            messages.append(message)
        elif kind in _CALLS:
            i = turn.calls(items, i, {"role": "assistant", "content": None})
            continue
        elif kind == "reasoning":
            turn.note_reasoning(item)
        # function_call_output items are placed with their call.
        i += 1
    return messages


def _plain_name(name: str, namespace: str | None) -> str:
    return name


def _next_call(items: list[dict[str, Any]], i: int) -> int | None:
    """Index of the next tool call if only reasoning items come before it."""
    while i < len(items):
        kind = items[i].get("type")
        if kind in _CALLS:
            return i
        if kind != "reasoning":
            return None
        i += 1
    return None


@dataclass(slots=True)
class _Turn:
    """What :func:`items_to_messages` carries from one assistant turn to the next."""

    outputs: dict[str, list[int]]
    claimed: set[int]
    messages: list[dict[str, Any]]
    limits: tuple[int, int]
    tool_name: Callable[[str, str | None], str]
    reasoning_text: Callable[[dict[str, Any]], str | None] | None
    reasoning: list[str] = field(default_factory=list)

    def note_reasoning(self, item: dict[str, Any]) -> None:
        if self.reasoning_text is not None:
            text = self.reasoning_text(item)
            if text:
                self.reasoning.append(text)

    def take_reasoning(self, assistant: dict[str, Any]) -> None:
        if self.reasoning:
            assistant["reasoning_content"] = "\n\n".join(self.reasoning)
            self.reasoning = []

    def calls(self, items: list[dict[str, Any]], i: int, assistant: dict[str, Any]) -> int:
        """Append one assistant message with the calls starting at ``items[i]`` and their tool
        messages; return the index of the first item after the calls."""
        calls: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        images: list[dict[str, Any]] = []
        seen: set[str] = set()
        while i < len(items) and (items[i].get("type") in _CALLS or items[i].get("type") == "reasoning"):
            item = items[i]
            kind = item["type"]
            if kind == "reasoning":
                self.note_reasoning(item)
            elif kind in ("function_call", "custom_tool_call"):
                call_id = item["call_id"]
                answer = None
                if call_id not in seen:
                    answer = _claim_output(self.outputs.get(call_id, ()), i, self.claimed)
                if answer is not None:
                    seen.add(call_id)
                    calls.append(self._tool_call(call_id, item))
                    content, found = _tool_output_content(items[answer]["output"])
                    answers.append({"role": "tool", "tool_call_id": call_id, "content": content})
                    if found:
                        note = f"Images returned by tool call {call_id}:"
                        images += [{"type": "text", "text": note}, *found]
            else:  # mcp_call
                call_id = item.get("call_id") or item["id"]
                if call_id not in seen:
                    seen.add(call_id)
                    calls.append(self._tool_call(call_id, item))
                    text = truncate_for_model(
                        _mcp_output_text(item), max_bytes=self.limits[0], max_lines=self.limits[1]
                    )
                    answers.append({"role": "tool", "tool_call_id": call_id, "content": text})
            i += 1
        if calls:
            assistant["tool_calls"] = calls
        self.take_reasoning(assistant)
        if calls or assistant.get("content") or assistant.get("reasoning_content"):
            self.messages.append(assistant)
        self.messages.extend(answers)
        if images:
            self.messages.append({"role": "user", "content": images})
        return i

    def _tool_call(self, call_id: str, item: dict[str, Any]) -> dict[str, Any]:
        if item["type"] == "custom_tool_call":
            name = self.tool_name(item["name"], item.get("namespace"))
            arguments = custom_arguments(item["input"])
        elif item["type"] == "function_call":
            name = self.tool_name(item["name"], item.get("namespace"))
            arguments = item.get("arguments") or ""
        else:
            name, arguments = item["name"], item.get("arguments") or ""
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _claim_output(positions: Any, after: int, claimed: set[int]) -> int | None:
    for position in positions:
        if position > after and position not in claimed:
            claimed.add(position)
            return position
    return None


def _mcp_output_text(item: dict[str, Any]) -> str:
    """What the model saw for a hosted tool call: its output, or ``Error: <message>``."""
    error = item.get("error")
    output = item.get("output")
    if error is None and output is not None and item.get("status") in (None, "completed"):
        return output
    if isinstance(error, dict):
        error = error.get("content", error.get("message"))
    if error is not None and error != "":
        return f"Error: {tool_output_text(error)}"
    if item.get("status") == "failed":
        return "Error: the tool call failed"
    return "Error: the tool call did not finish"


def _tool_output_content(output: str | list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A ``function_call_output``'s output as tool-message text, plus any image/file parts."""
    if isinstance(output, str):
        return output, []
    parts = [_chat_part(part) for part in output]
    texts = [part["text"] for part in parts if part["type"] == "text"]
    return "\n".join(texts), [part for part in parts if part["type"] != "text"]


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "input_image":
        return {
            "type": "image_url",
            "image_url": {"url": part["image_url"], "detail": part.get("detail") or "auto"},
        }
    if kind == "input_file":
        file: dict[str, Any] = {"file_data": part["file_data"]}
        if part.get("filename"):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    text = part["refusal"] if kind == "refusal" else part["text"]
    return {"type": "text", "text": text}


def _message(item: dict[str, Any]) -> dict[str, Any]:
    role = "system" if item["role"] == "developer" else item["role"]
    parts = item["content"]
    if all(part["type"] in _TEXT_PARTS or part["type"] == "refusal" for part in parts):
        texts = (part["refusal"] if part["type"] == "refusal" else part["text"] for part in parts)
        return {"role": role, "content": "\n".join(texts)}
    return {"role": role, "content": [_chat_part(part) for part in parts]}


# -- tools and the request body ----------------------------------------------------------------


def tools_to_chat(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses function tools → Chat Completions tools.

    ``{"type":"function","name","description","parameters","strict"}`` →
    ``{"type":"function","function":{"name","description","parameters","strict"}}`` with None
    fields omitted. Any other tool type raises InvalidRequestError (param ``tools[i].type``).
    """
    chat = []
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise unsupported_value(
                f"tools[{i}].type",
                f"Tools of type '{kind}' are not supported by this gateway; use function tools.",
            )
        function = {
            key: tool[key]
            for key in ("name", "description", "parameters", "strict")
            if tool.get(key) is not None
        }
        chat.append({"type": "function", "function": function})
    return chat


def build_chat_request(
    request: dict[str, Any],
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    *,
    stream: bool,
    tool_name: Callable[[str, str | None], str] | None = None,
) -> dict[str, Any]:
    """The Chat Completions body for a validated Responses ``request``.

    ``messages`` come from :func:`items_to_messages`, ``tools`` from :func:`tools_to_chat`.
    ``instructions`` become the first (system) message; ``tools``, ``tool_choice`` and
    ``parallel_tool_calls`` are sent only with tools (a function or custom ``tool_choice`` names
    the upstream function ``tool_name(name, namespace)``, ``allowed_tools`` sends its ``mode``,
    a hosted tool type ``auto``); ``max_output_tokens`` → ``max_tokens``;
    ``text.format`` → ``response_format``; ``reasoning.effort`` → ``reasoning_effort``;
    streaming asks for ``stream_options.include_usage``. Absent or null fields are omitted, unknown
    request fields ignored.
    """
    instructions = request.get("instructions")
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    body: dict[str, Any] = {"model": request["model"], "messages": messages}
    if tools:
        body["tools"] = tools
        choice = request.get("tool_choice")
        if isinstance(choice, dict):
            body["tool_choice"] = _tool_choice(choice, tool_name or _plain_name)
        elif choice is not None:
            body["tool_choice"] = choice
        if request.get("parallel_tool_calls") is not None:
            body["parallel_tool_calls"] = request["parallel_tool_calls"]
    for source, target in _SAMPLING.items():
        if request.get(source) is not None:
            body[target] = request[source]
    text_format = (request.get("text") or {}).get("format") or {}
    if text_format.get("type") == "json_schema":
        schema = {
            key: text_format[key]
            for key in ("name", "description", "schema", "strict")
            if text_format.get(key) is not None
        }
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif text_format.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    effort = (request.get("reasoning") or {}).get("effort")
    if effort is not None:
        body["reasoning_effort"] = effort
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _tool_choice(choice: dict[str, Any], tool_name: Callable[[str, str | None], str]) -> Any:
    kind = choice.get("type")
    if kind in ("function", "custom") and isinstance(choice.get("name"), str):
        name = tool_name(choice["name"], choice.get("namespace"))
        return {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        return choice["mode"]
    return "auto"
