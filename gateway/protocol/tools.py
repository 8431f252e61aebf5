"""The tool types real clients send, as a Chat Completions upstream can be offered them.

A Chat Completions upstream knows one tool type, ``function``. The Responses API has more, and
real clients send them (Codex CLI, the Vercel AI SDK):

* ``function`` — offered as is (``{"type": "function", "name", "description", "parameters",
  "strict"}``);
* ``custom`` — freeform text input, optionally constrained by a grammar (Codex CLI's
  ``apply_patch``: ``"format": {"type": "grammar", "syntax": "lark", "definition": …}``).
  Offered as a function with one string parameter ``input``; the grammar and the description
  go into the function's description. Its calls come back as ``custom_tool_call`` items whose
  ``input`` is that string;
* ``namespace`` — function/custom tools grouped under a name (``{"type": "namespace", "name",
  "description", "tools": [...]}``). Each member is offered under a collision-free flat name
  (``<namespace>__<name>``); its calls come back with the member's own ``name`` and the
  ``namespace`` field set, as the openai SDK's ``ResponseFunctionToolCall`` /
  ``ResponseCustomToolCall`` define;
* hosted OpenAI tool types the gateway cannot run itself (``web_search``, ``file_search``,
  ``code_interpreter``, ``image_generation``, ``computer_use_preview``, ``local_shell``,
  ``shell``, ``apply_patch``, …): offered as the registered server-side tool named for that type
  in ``hosted_tool_map`` (``{"web_search": "my_search_tool"}``), otherwise left out of what the
  model is offered (never an error: the client goes on without them) and reported in
  :attr:`ToolPlan.left_out`.

:func:`plan_tools` is pure; it is run per request and per stored response (replays), so a stored
request always maps to the same upstream names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "CUSTOM_INPUT_KEY",
    "ClientTool",
    "CustomInputDecoder",
    "ToolPlan",
    "custom_arguments",
    "custom_input",
    "plan_tools",
]

#: The one parameter of the function a ``custom`` tool is offered as.
CUSTOM_INPUT_KEY = "input"
_CUSTOM_PARAMETERS = {
    "type": "object",
    "properties": {CUSTOM_INPUT_KEY: {"type": "string", "description": "The raw input text."}},
    "required": [CUSTOM_INPUT_KEY],
    "additionalProperties": False,
}
# Types a request may carry that this module handles itself; `mcp` belongs to the MCP support.
_OWN_TYPES = frozenset({"function", "custom", "namespace", "mcp"})
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_NAME = 64  # OpenAI's limit for function names, which many upstreams copy


@dataclass(frozen=True, slots=True)
class ClientTool:
    """What an upstream function name stands for: a client ``function`` or ``custom`` tool,
    its own ``name``, and its ``namespace`` (None outside one)."""

    kind: str
    name: str
    namespace: str | None = None


@dataclass(slots=True)
class ToolPlan:
    """The request's tools as the upstream sees them.

    ``functions``: Responses function tools (``{"type": "function", "name", …}``) in the
    request's order, custom and namespaced tools under their upstream names, mapped hosted types
    as ``{"type": "function", "name": <registered tool>}`` (the registry resolves those);
    ``client``: upstream name → :class:`ClientTool` for every custom or namespaced tool (plain
    function tools are absent: their upstream name is their name); ``left_out``: the types of
    hosted tools nobody runs, in request order, each once; ``mapped``: hosted type → registered
    tool name, for the types that were mapped.
    """

    functions: list[dict[str, Any]] = field(default_factory=list)
    client: dict[str, ClientTool] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)

    def upstream_name(self, name: str, namespace: str | None = None) -> str:
        """The upstream function name of the client tool ``name`` (in ``namespace``)."""
        if namespace is None:
            return name
        for upstream, tool in self.client.items():
            if tool.name == name and tool.namespace == namespace:
                return upstream
        return _flat(namespace, name)


def _flat(namespace: str, name: str) -> str:
    return _NAME_CHARS.sub("_", f"{namespace}__{name}")[:_MAX_NAME]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        suffix = f"_{n}"
        candidate = name[: _MAX_NAME - len(suffix)] + suffix
        n += 1
    taken.add(candidate)
    return candidate


def _custom_description(tool: Mapping[str, Any]) -> str:
    lines = [tool.get("description") or f"The {tool.get('name')} tool."]
    lines.append(
        f"This is a freeform tool: put the raw text input in the '{CUSTOM_INPUT_KEY}' "
        "string, not JSON."
    )
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        syntax = fmt.get("syntax") or "lark"
        lines.append(f"The input must match this {syntax} grammar:\n{fmt.get('definition') or ''}")
    return "\n".join(lines)


def _function(tool: Mapping[str, Any], upstream: str) -> dict[str, Any]:
    """A request function or custom tool as the Responses function tool offered upstream."""
    if tool.get("type") == "custom":
        return {
            "type": "function",
            "name": upstream,
            "description": _custom_description(tool),
            "parameters": _CUSTOM_PARAMETERS,
        }
    offered = {key: tool[key] for key in ("description", "parameters", "strict") if key in tool}
    return {"type": "function", "name": upstream, **offered}


def plan_tools(
    request_tools: Any, hosted_tool_map: Mapping[str, str] | None = None
) -> ToolPlan:
    """Flatten a validated request's ``tools`` into functions for the upstream (see the module
    docstring). Never raises for tools :func:`gateway.protocol.validation.validate_request`
    accepted; anything malformed is skipped."""
    plan = ToolPlan()
    if not isinstance(request_tools, list):
        return plan
    # Plain function names keep their name; flattened names must not collide with them.
    taken = {
        tool["name"]
        for tool in request_tools
        if isinstance(tool, dict) and tool.get("type") in ("function", "custom")
        and isinstance(tool.get("name"), str)
    }
    members: set[tuple[str, str]] = set()
    for tool in request_tools:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind == "function":
            plan.functions.append(tool)
        elif kind == "custom" and isinstance(tool.get("name"), str):
            plan.functions.append(_function(tool, tool["name"]))
            plan.client[tool["name"]] = ClientTool("custom", tool["name"])
        elif kind == "namespace" and isinstance(tool.get("name"), str):
            for member in tool.get("tools") or ():
                if not isinstance(member, dict) or not isinstance(member.get("name"), str):
                    continue
                if (tool["name"], member["name"]) in members:
                    continue  # a repeated member: offered once
                members.add((tool["name"], member["name"]))
                member_kind = "custom" if member.get("type") == "custom" else "function"
                upstream = _unique(_flat(tool["name"], member["name"]), taken)
                plan.functions.append(_function(member, upstream))
                plan.client[upstream] = ClientTool(member_kind, member["name"], tool["name"])
        elif isinstance(kind, str) and kind not in _OWN_TYPES:
            target = (hosted_tool_map or {}).get(kind)
            if target:
                if kind not in plan.mapped:
                    plan.mapped[kind] = target
                    plan.functions.append({"type": "function", "name": target})
            elif kind not in plan.left_out:
                plan.left_out.append(kind)
    return plan


def custom_input(arguments: str) -> str:
    """The freeform input of a custom tool call from the upstream's ``arguments`` JSON
    (``{"input": "…"}``); arguments that are not that shape are taken as the input itself."""
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_INPUT_KEY), str):
        return value[CUSTOM_INPUT_KEY]
    if isinstance(value, str):
        return value
    return arguments


def custom_arguments(text: str) -> str:
    """The upstream ``arguments`` JSON for a custom tool call's ``input``."""
    return orjson.dumps({CUSTOM_INPUT_KEY: text}).decode()


_INPUT_START = re.compile(r'\s*\{\s*"' + CUSTOM_INPUT_KEY + r'"\s*:\s*"')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class CustomInputDecoder:
    """Decodes a custom tool call's ``input`` while its ``{"input": "…"}`` arguments stream in.

    :meth:`feed` takes the next piece of the arguments JSON and returns the newly decoded text
    of the ``input`` string (``""`` while nothing new is complete). Arguments of another shape
    (another key first, not an object) decode to nothing; the call's final ``input`` then
    comes from :func:`custom_input` at the end.
    """

    __slots__ = ("_buffer", "_position", "_state")

    def __init__(self) -> None:
        self._buffer = ""
        self._position = 0
        self._state = "start"  # start | string | done

    def feed(self, piece: str) -> str:
        self._buffer += piece
        if self._state == "start":
            match = _INPUT_START.match(self._buffer)
            if match is None:
                if not _could_start(self._buffer):
                    self._state = "done"
                return ""
            self._state, self._position = "string", match.end()
        if self._state != "string":
            return ""
        out: list[str] = []
        buffer, i, n = self._buffer, self._position, len(self._buffer)
        while i < n:
            char = buffer[i]
            if char == '"':
                self._state = "done"
                break
            if char != "\\":
                out.append(char)
                i += 1
                continue
            if i + 1 >= n:
                break  # the escape is not complete yet
            code = buffer[i + 1]
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                i += 2
                continue
            if code != "u" or i + 6 > n:
                if code != "u":
                    self._state = "done"  # not JSON: leave it to custom_input
                break
            unit = int(buffer[i + 2 : i + 6], 16)
            if 0xD800 <= unit < 0xDC00:  # a surrogate pair needs its second half
                if i + 12 > n:
                    break
                low = int(buffer[i + 8 : i + 12], 16)
                out.append(chr(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
            else:
                out.append(chr(unit))
                i += 6
        self._position = i
        return "".join(out)


def _could_start(text: str) -> bool:
    """Whether ``text`` may still grow into the ``{"input": "`` opening."""
    opening = '{"' + CUSTOM_INPUT_KEY + '":"'
    compact = re.sub(r"\s+", "", text)
    return opening.startswith(compact) or compact.startswith(opening)
