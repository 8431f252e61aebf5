"""The Responses API ``Response`` object, with every key the Open Responses suite expects.

:func:`response_object` is used for ``POST`` results, stream snapshots
(``response.created`` … ``response.completed``) and ``GET /v1/responses/{id}``, so the three
always agree. Request settings are echoed from the stored request body; keys the request did not
set get the OpenAI defaults (``tool_choice: "auto"``, ``truncation: "disabled"``, …) or null.
"""

from __future__ import annotations

from typing import Any

__all__ = ["response_object"]


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

    def setting(key: str, default: Any = None) -> Any:
        value = get(key)
        return default if value is None else value

    return {
        "id": id,
        "object": "response",
        "created_at": int(created_at),
        "completed_at": None if completed_at is None else int(completed_at),
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "model": model,
        "output": output,
        "instructions": get("instructions"),
        "metadata": setting("metadata", {}),
        "parallel_tool_calls": setting("parallel_tool_calls", True),
        "temperature": get("temperature"),
        "top_p": get("top_p"),
        "tool_choice": setting("tool_choice", "auto"),
        "tools": _tools(get("tools")),
        "previous_response_id": get("previous_response_id"),
        "store": setting("store", True),
        "background": setting("background", False),
        "max_output_tokens": get("max_output_tokens"),
        "max_tool_calls": get("max_tool_calls"),
        "text": setting("text") or {"format": {"type": "text"}},
        "truncation": setting("truncation", "disabled"),
        "reasoning": get("reasoning"),
        "user": get("user"),
        "service_tier": "default",
        "presence_penalty": setting("presence_penalty", 0.0),
        "frequency_penalty": setting("frequency_penalty", 0.0),
        "top_logprobs": setting("top_logprobs", 0),
        "safety_identifier": get("safety_identifier"),
        "prompt_cache_key": get("prompt_cache_key"),
        "usage": usage,
    }
