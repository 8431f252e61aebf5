"""The Responses API ``Response`` object, with every key the Open Responses suite expects, and
its ``usage`` object.

:func:`response_object` is used for ``POST`` results, stream snapshots
(``response.created`` … ``response.completed``) and ``GET /v1/responses/{id}``, so the three
always agree. Request settings are echoed from the stored request body; keys the request did not
set get the OpenAI defaults (``tool_choice: "auto"``, ``truncation: "disabled"``, …) or null.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "add_chat_usage",
    "add_usage",
    "chat_usage_to_response_usage",
    "response_object",
    "zero_usage",
]


def _tools(tools: Any) -> list[Any]:
    """The request's tools in Responses format; function tools get every key (null if unset)."""
    if not isinstance(tools, list):
        return []
    echoed = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            tool = {"description": None, "parameters": None, "strict": None, **tool}
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


# -- usage --------------------------------------------------------------------------------------


def zero_usage() -> dict[str, Any]:
    """A Responses usage object with every count 0."""
    return {
        "input_tokens": 0,
        # cache_write_tokens: the installed SDK's InputTokensDetails requires it.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 0,
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chat_usage_to_response_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Chat Completions ``usage`` → Responses ``usage``, both detail objects always present.

    ``prompt_tokens`` → ``input_tokens``, ``completion_tokens`` → ``output_tokens``,
    ``prompt_tokens_details.cached_tokens`` → ``input_tokens_details.cached_tokens``,
    ``completion_tokens_details.reasoning_tokens`` → ``output_tokens_details.reasoning_tokens``;
    ``total_tokens`` is the upstream's, or input + output. None (or missing counts) → 0. A usage
    object already in the Responses shape is passed through normalized.
    """
    result = zero_usage()
    if not isinstance(usage, dict):
        return result
    if "input_tokens" in usage and "prompt_tokens" not in usage:
        in_details = usage.get("input_tokens_details") or {}
        out_details = usage.get("output_tokens_details") or {}
        inputs, outputs = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    else:
        in_details = usage.get("prompt_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or {}
        inputs, outputs = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    result["input_tokens"] = inputs
    result["output_tokens"] = outputs
    result["total_tokens"] = _count(usage.get("total_tokens")) or inputs + outputs
    if isinstance(in_details, dict):
        result["input_tokens_details"]["cached_tokens"] = _count(in_details.get("cached_tokens"))
        result["input_tokens_details"]["cache_write_tokens"] = _count(
            in_details.get("cache_write_tokens")
        )
    if isinstance(out_details, dict):
        result["output_tokens_details"]["reasoning_tokens"] = _count(
            out_details.get("reasoning_tokens")
        )
    return result


def add_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The sum of two Responses usage objects (None counts as zero); a new dict."""
    a = chat_usage_to_response_usage(total)
    b = chat_usage_to_response_usage(usage)
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        a[key] += b[key]
    for details in ("input_tokens_details", "output_tokens_details"):
        for key, value in b[details].items():
            a[details][key] += value
    return a


def add_chat_usage(
    total: dict[str, Any] | None, chat_usage: dict[str, Any] | None
) -> dict[str, Any]:
    """``total`` (Responses usage or None) plus one Chat Completions ``usage``; a new dict."""
    return add_usage(total, chat_usage_to_response_usage(chat_usage))
