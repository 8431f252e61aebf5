"""The Responses API ``Response`` object, with every key the Open Responses suite expects.

:func:`response_object` is used for ``POST`` results, stream snapshots
(``response.created`` … ``response.completed``) and ``GET /v1/responses/{id}``, so the three
always agree. Request settings are echoed from the stored request body; keys the request did not
set get the values OpenAI returns then (``temperature: 1.0``, ``top_p: 1.0``, ``tool_choice:
"auto"``, ``truncation: "disabled"``, ``text: {"format": {"type": "text"}, "verbosity":
"medium"}``, ``service_tier: "default"``, ``metadata: {}``, …); null only where OpenAI gives null
too (``instructions``, ``max_output_tokens``, ``user``, …). The keys are those of openai-python's
``types/responses/response.py`` and the Open Responses ``ResponseResource`` schema (which requires
every one of them to be present). Keys are in OpenAI's (alphabetical) order.
"""

from __future__ import annotations

from typing import Any

__all__ = ["response_object"]

_TEXT_FORMAT = {"type": "text"}
_DEFAULT_TEXT = {"format": _TEXT_FORMAT, "verbosity": "medium"}


def _tools(tools: Any) -> list[Any]:
    """The request's tools in Responses format; function tools get every key (null if unset)."""
    if not isinstance(tools, list):
        return []
    echoed = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            tool = {"description": None, "parameters": None, "strict": None, **tool}
        elif isinstance(tool, dict) and tool.get("type") == "mcp":
            # Credentials for the MCP server are never echoed.
            tool = {k: v for k, v in tool.items() if k != "authorization"}
            if isinstance(tool.get("headers"), dict):
                tool["headers"] = {k: "***" for k in tool["headers"]}
        echoed.append(tool)
    return echoed


def response_object(
    *,
    id: str,
    created_at: float,
    model: str,
    request: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
    incomplete_details: dict[str, Any] | None = None,
    completed_at: float | None = None,
) -> dict[str, Any]:
    """The full ``Response`` dict (``object: "response"``).

    ``request`` is the original ``POST /v1/responses`` body (its settings are echoed);
    ``created_at`` / ``completed_at`` are Unix seconds (floats), rendered as int seconds;
    ``output`` the output items (never null); ``usage`` a Responses usage object or None;
    ``error`` ``{"code", "message"}`` or None; ``incomplete_details`` ``{"reason"}`` or None.
    The ``output`` list is referenced, not copied.
    """
    get = request.get
    # A setting's value, or its default when absent or null (inlined: this runs per response).
    background = get("background")
    frequency_penalty = get("frequency_penalty")
    metadata = get("metadata")
    parallel_tool_calls = get("parallel_tool_calls")
    presence_penalty = get("presence_penalty")
    store = get("store")
    temperature = get("temperature")
    tool_choice = get("tool_choice")
    top_logprobs = get("top_logprobs")
    top_p = get("top_p")
    truncation = get("truncation")
    return {
        "id": id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "background": False if background is None else background,
        "completed_at": None if completed_at is None else int(completed_at),
        "conversation": _conversation(get("conversation")),
        "error": error,
        "frequency_penalty": 0.0 if frequency_penalty is None else frequency_penalty,
        "incomplete_details": incomplete_details,
        "instructions": get("instructions"),
        "max_output_tokens": get("max_output_tokens"),
        "max_tool_calls": get("max_tool_calls"),
        "metadata": {} if metadata is None else metadata,
        "model": model,
        "output": output,
        "parallel_tool_calls": True if parallel_tool_calls is None else parallel_tool_calls,
        "presence_penalty": 0.0 if presence_penalty is None else presence_penalty,
        "previous_response_id": get("previous_response_id"),
        "prompt_cache_key": get("prompt_cache_key"),
        "prompt_cache_retention": get("prompt_cache_retention"),
        "reasoning": _reasoning(get("reasoning")),
        "safety_identifier": get("safety_identifier"),
        "service_tier": "default",
        "store": True if store is None else store,
        "temperature": 1.0 if temperature is None else temperature,
        "text": _text(get("text")),
        "tool_choice": "auto" if tool_choice is None else tool_choice,
        "tools": _tools(get("tools")),
        "top_logprobs": 0 if top_logprobs is None else top_logprobs,
        "top_p": 1.0 if top_p is None else top_p,
        "truncation": "disabled" if truncation is None else truncation,
        "usage": usage,
        "user": get("user"),
    }


def _conversation(conversation: Any) -> dict[str, Any] | None:
    """The request's ``conversation`` (an id or ``{"id"}``) as the Response's ``{"id"}``."""
    if isinstance(conversation, str):
        return {"id": conversation}
    if isinstance(conversation, dict) and isinstance(conversation.get("id"), str):
        return {"id": conversation["id"]}
    return None


def _reasoning(reasoning: Any) -> dict[str, Any]:
    """``{"effort", "summary"}`` as OpenAI echoes it (both null when not asked for)."""
    if not isinstance(reasoning, dict):
        return {"effort": None, "summary": None}
    summary = reasoning.get("summary") or reasoning.get("generate_summary")
    return {"effort": reasoning.get("effort"), "summary": summary}


def _text(text: Any) -> dict[str, Any]:
    """``{"format", "verbosity"}``: the request's, else plain text at ``medium`` verbosity."""
    if not isinstance(text, dict):
        return _DEFAULT_TEXT
    return {
        "format": text.get("format") or _TEXT_FORMAT,
        "verbosity": text.get("verbosity") or "medium",
    }
