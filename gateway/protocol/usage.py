"""Token accounting: Chat Completions ``usage`` → Responses ``usage``, and sums of them.

The Responses shape (openai-python ``types/responses/response_usage.py``)::

    {"input_tokens": int, "input_tokens_details": {"cached_tokens": int, "cache_write_tokens": int},
     "output_tokens": int, "output_tokens_details": {"reasoning_tokens": int}, "total_tokens": int}
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_chat_usage", "add_usage", "chat_usage_to_response_usage", "zero_usage"]


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
    if value.__class__ is int:  # the usual case (JSON integers), without the isinstance checks
        return value if value > 0 else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chat_usage_to_response_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Chat Completions ``usage`` → Responses ``usage``, both detail objects always present.

    ``prompt_tokens`` → ``input_tokens``, ``completion_tokens`` → ``output_tokens``,
    ``prompt_tokens_details.cached_tokens`` → ``input_tokens_details.cached_tokens``,
    ``completion_tokens_details.reasoning_tokens`` → ``output_tokens_details.reasoning_tokens``;
    ``total_tokens`` is the upstream's, or input + output. None (or missing counts) → 0. A usage
    object already in the Responses shape is passed through normalized.
    """
    if not isinstance(usage, dict):
        return zero_usage()
    get = usage.get
    if "input_tokens" in usage and "prompt_tokens" not in usage:
        in_details = get("input_tokens_details") or _NONE
        out_details = get("output_tokens_details") or _NONE
        inputs, outputs = _count(get("input_tokens")), _count(get("output_tokens"))
    else:
        in_details = get("prompt_tokens_details") or _NONE
        out_details = get("completion_tokens_details") or _NONE
        inputs, outputs = _count(get("prompt_tokens")), _count(get("completion_tokens"))
    if isinstance(in_details, dict):
        cached = _count(in_details.get("cached_tokens"))
        written = _count(in_details.get("cache_write_tokens"))
    else:
        cached = written = 0
    reasoning = _count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
    return {
        "input_tokens": inputs,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": outputs,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": _count(get("total_tokens")) or inputs + outputs,
    }


_NONE: dict[str, Any] = {}


def add_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The sum of two Responses usage objects (None counts as zero); a new dict."""
    if total is None:
        return chat_usage_to_response_usage(usage)  # zero plus it: it, normalized
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
    return add_usage(total, chat_usage)  # add_usage normalizes both (either shape)
