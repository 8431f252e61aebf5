"""Compaction: a conversation replaced by a summary the upstream model writes, sealed for the client.

``POST /v1/responses/compact`` (openai-python ``responses.compact``, ``CompactedResponse``)
takes a create-like body (``model`` required; ``input``, ``instructions``,
``previous_response_id``), asks the upstream model for a summary of the whole conversation and
returns::

    {"id": "cmp_…", "object": "response.compaction", "created_at": int,
     "output": [<every user message, in order>, {"type": "compaction", "id": "cmp_…",
                "encrypted_content": "<Fernet token>"}],
     "usage": <Responses usage of the summary call>}

``encrypted_content`` is ``seal({"summary", "model", "created_at"}, key)``
(:mod:`gateway.protocol.sealed`): opaque to the client, refused if changed. A ``compaction`` item
sent back in ``input`` (``POST /v1/responses``, ``/compact`` again, ``input_tokens``) is expanded
by :func:`expand_compactions` into one user message carrying the summary, which is what the
upstream sees in its place.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from executors.upstream import UpstreamError as UpstreamCallError
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    RateLimitError,
    UpstreamError,
)
from gateway.protocol.checks import bad_value
from gateway.protocol.context_window import SUMMARY_PREFIX, SUMMARY_PROMPT
from gateway.protocol.convert import items_to_messages, normalize_input
from gateway.protocol.sealed import seal, unseal
from gateway.protocol.usage import chat_usage_to_response_usage
from store.types import new_id

if TYPE_CHECKING:
    from executors.resilience import ResilientUpstream

__all__ = [
    "compact",
    "compact_threshold_of",
    "compaction_item",
    "expand_compactions",
    "summarize",
    "upstream_error",
]

def compaction_item(summary: str, key: str, *, model: str, created_at: float) -> dict[str, Any]:
    """A ``compaction`` output item sealing ``summary`` with ``key``."""
    payload = {"summary": summary, "model": model, "created_at": int(created_at)}
    return {"type": "compaction", "id": new_id("cmp"), "encrypted_content": seal(payload, key)}


def expand_compactions(
    items: list[dict[str, Any]], key: str | None, *, param: str = "input"
) -> list[dict[str, Any]]:
    """``items`` with every ``compaction`` item replaced by a user message holding its summary
    (same ``id``); the same list when there is none. Raises InvalidRequestError (400, code
    ``invalid_encrypted_content``) for a token this gateway did not seal with ``key``."""
    if not any(item.get("type") == "compaction" for item in items):
        return items
    expanded = []
    for item in items:
        if item.get("type") != "compaction":
            expanded.append(item)
            continue
        if key is None:
            raise InvalidRequestError(
                "compaction items cannot be opened: this gateway has no encrypted_content key.",
                param=param, code="invalid_encrypted_content",
            )
        summary = unseal(item["encrypted_content"], key, param=param).get("summary")
        if not isinstance(summary, str):
            raise InvalidRequestError(
                "The compaction item holds no summary.", param=param,
                code="invalid_encrypted_content",
            )
        expanded.append(
            {
                "type": "message",
                "id": item.get("id"),
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": SUMMARY_PREFIX + summary}],
            }
        )
    return expanded


def compact_threshold_of(context_management: Any, context_window: int | None) -> int | None:
    """The token threshold of a create body's ``context_management``
    (``[{"type": "compaction", "compact_threshold": N}]``); without ``compact_threshold``, four
    fifths of the model's known context window; None when there is no compaction entry (or no
    threshold can be known). Raises InvalidRequestError naming the entry."""
    if context_management is None:
        return None
    if not isinstance(context_management, list):
        raise bad_value("context_management", "a list of context management entries")
    threshold = None
    for i, entry in enumerate(context_management):
        param = f"context_management[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise bad_value(f"{param}.type", "a string")
        if entry["type"] != "compaction":
            raise InvalidRequestError(
                f"Context management entries of type '{entry['type']}' are not supported; "
                "use 'compaction'.", param=f"{param}.type", code="unsupported_value",
            )
        value = entry.get("compact_threshold")
        if value is None:
            value = context_window * 4 // 5 if context_window else None
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_value(f"{param}.compact_threshold", "an integer of at least 1")
        if value is not None:
            threshold = value if threshold is None else min(threshold, value)
    return threshold


def summary_request(
    model: str, items: list[dict[str, Any]], *, instructions: str | None = None
) -> dict[str, Any]:
    """The Chat Completions body asking ``model`` for a summary of ``items`` (already expanded)."""
    messages = items_to_messages(items)
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    messages.append({"role": "user", "content": SUMMARY_PROMPT})
    return {"model": model, "messages": messages, "stream": False}


def _summary_text(completion: dict[str, Any]) -> str:
    try:
        content = completion["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        content = None
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content.strip() if isinstance(content, str) else ""


def upstream_error(exc: UpstreamCallError) -> GatewayError:
    """The client-facing error for a failed upstream call made outside a response."""
    if exc.type == "insufficient_quota":
        return RateLimitError(exc.message, code="insufficient_quota")
    if exc.type == "rate_limited":
        return RateLimitError(exc.message)
    return UpstreamError(exc.message)


async def summarize(
    upstream: ResilientUpstream,
    model: str,
    items: list[dict[str, Any]],
    *,
    instructions: str | None = None,
) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    """Ask ``model`` for a summary of ``items`` (expanded). Returns ``(summary, chat usage,
    the request body sent)``. Raises the upstream's UpstreamError."""
    request = summary_request(model, items, instructions=instructions)
    completion = await upstream.chat_completion(request)
    return _summary_text(completion), completion.get("usage"), request


def _validate(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_value("model", "a non-empty string")
    if "\x00" in model:
        raise bad_value("model", "a model name without NUL characters")
    for key in ("instructions", "previous_response_id"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise bad_value(key, "a string")
    if body.get("input") is not None and not isinstance(body["input"], (str, list)):
        raise bad_value("input", "a string or a list of input items")


async def compact(
    service: Any,
    body: dict[str, Any],
    tenant: str | None,
    *,
    key: str,
    upstream_key: str | None = None,
) -> dict[str, Any]:
    """``POST /v1/responses/compact`` (see the module docstring) for ``service`` (the
    :class:`gateway.engine.service.ResponsesService`, which imports this module). Everything is checked before
    the upstream is called: 400 without ``model``, for malformed input, or for a foreign
    compaction item; ``previous_response_not_found`` for an unknown previous response. Upstream
    failures are 429 / 502 as for a response."""
    _validate(body)
    compaction_id = new_id("cmp")
    history = await service.history_for(body.get("previous_response_id"), tenant)
    input_items = normalize_input(body.get("input") or [], compaction_id)
    items = history + input_items
    expanded = expand_compactions(items, key)
    upstream = service.deps.upstream
    if upstream_key:
        upstream = upstream.with_api_key(upstream_key)
    try:
        summary, usage, _request = await summarize(
            upstream, body["model"], expanded, instructions=body.get("instructions")
        )
    except UpstreamCallError as exc:
        raise upstream_error(exc) from None
    created_at = time.time()
    kept = [i for i in items if i.get("type") == "message" and i.get("role") == "user"]
    return {
        "id": compaction_id,
        "object": "response.compaction",
        "created_at": int(created_at),
        "output": [
            *kept,
            compaction_item(summary, key, model=body["model"], created_at=created_at),
        ],
        "usage": chat_usage_to_response_usage(usage),
    }
