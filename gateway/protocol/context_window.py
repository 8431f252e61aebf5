"""Fitting a Chat Completions body into a context window: token estimates, truncation and the
summary (compaction) request — pure functions over message lists.

* :func:`estimate_tokens` — 4 tokens per message plus one per four UTF-8 bytes of its text
  (tool-call names and arguments included), 85 per image or file part, one per four bytes of the
  tools' JSON, plus 3 for the reply's priming. No tokenizer: nothing to download.
* Messages are cut into **units**: the leading ``system`` messages (always kept), then each
  user message, each plain assistant message, and each assistant message with ``tool_calls``
  together with its ``tool`` messages (and a user message carrying their images), which are
  never split — a Chat upstream rejects a tool message without its call.
* :func:`truncate_messages` (``truncation: "auto"``) drops whole units from the oldest on until
  the estimate fits, never the last unit.
* :func:`compaction_request` / :func:`compacted_body` (``context_management`` compaction): the
  upstream is asked to summarize every unit before the last; the body then continues from
  the system messages, one user message with the summary, and the last unit.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "SUMMARY_PREFIX",
    "SUMMARY_PROMPT",
    "compacted_body",
    "compaction_request",
    "estimate_tokens",
    "is_compaction_request",
    "truncate_messages",
    "units",
]

#: The instruction appended to the conversation for a summary call.
SUMMARY_PROMPT = (
    "Summarize the conversation above so that it can be continued from the summary alone. "
    "Keep every fact, decision, name, number, file, tool result and open task that later turns "
    "may need, and the user's goals and preferences; leave out pleasantries. Write it as a "
    "compact list of notes, in the language of the conversation. Reply with the summary only."
)
#: How a summary is introduced where the conversation it replaces stood.
SUMMARY_PREFIX = "Summary of the earlier conversation (compacted):\n\n"

_PER_MESSAGE = 4
_REPLY_PRIMING = 3
_PER_MEDIA_PART = 85


def _bytes_tokens(text: str) -> int:
    return (len(text.encode("utf-8")) + 3) // 4


def _message_tokens(message: dict[str, Any]) -> int:
    total = _PER_MESSAGE
    content = message.get("content")
    if isinstance(content, str):
        total += _bytes_tokens(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    total += _bytes_tokens(part.get("text") or "")
                else:
                    total += _PER_MEDIA_PART
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        total += _bytes_tokens((function.get("name") or "") + (function.get("arguments") or ""))
    return total


def estimate_tokens(body: dict[str, Any]) -> int:
    """The estimated prompt tokens of a Chat Completions ``body`` (module docstring)."""
    total = _REPLY_PRIMING + sum(_message_tokens(m) for m in body.get("messages") or ())
    if body.get("tools"):
        total += _bytes_tokens(orjson.dumps(body["tools"]).decode())
    return total


def units(messages: list[dict[str, Any]]) -> tuple[int, list[tuple[int, int]]]:
    """``(n, spans)``: the number of leading system messages, and the ``[start, end)`` spans of
    the units after them, in order (module docstring)."""
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    spans: list[tuple[int, int]] = []
    i = n
    while i < len(messages):
        end = i + 1
        if messages[i].get("role") == "assistant" and messages[i].get("tool_calls"):
            while end < len(messages) and messages[end].get("role") == "tool":
                end += 1
            # Images of tool outputs follow their tool messages as one user message.
            if end > i + 1 and end < len(messages) and _is_tool_images(messages[end]):
                end += 1
        spans.append((i, end))
        i = end
    return n, spans


def _is_tool_images(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return (
        message.get("role") == "user"
        and isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and p.get("type") != "text" for p in content)
    )


def truncate_messages(body: dict[str, Any], budget: int) -> dict[str, Any]:
    """``body`` with its oldest units dropped until :func:`estimate_tokens` is at most
    ``budget`` (the same dict when it fits already; the last unit and the system messages stay
    even if they alone are over)."""
    if estimate_tokens(body) <= budget:
        return body
    messages = body.get("messages") or []
    n, spans = units(messages)
    fixed = estimate_tokens({**body, "messages": messages[:n]})
    sizes = [sum(_message_tokens(m) for m in messages[a:b]) for a, b in spans]
    total = fixed + sum(sizes)
    first = 0
    while first < len(spans) - 1 and total > budget:
        total -= sizes[first]
        first += 1
    if first == 0:
        return body
    kept = messages[:n] + messages[spans[first][0]:]
    return {**body, "messages": kept}


def is_compaction_request(body: Any) -> bool:
    """Whether a model call's body is a summary request made by :func:`compaction_request`."""
    if not isinstance(body, dict):
        return False
    messages = body.get("messages") or []
    return bool(messages) and messages[-1] == _SUMMARY_MESSAGE


_SUMMARY_MESSAGE = {"role": "user", "content": SUMMARY_PROMPT}  # compared, never handed out


def compaction_request(body: dict[str, Any]) -> dict[str, Any] | None:
    """The summary request for ``body``: its system messages and every unit but the last, then
    :data:`SUMMARY_PROMPT`; not streamed. None when there is nothing before the last unit."""
    messages = body.get("messages") or []
    n, spans = units(messages)
    if len(spans) < 2:
        return None
    head = messages[: spans[-1][0]]
    return {
        "model": body["model"],
        "messages": [*head, {"role": "user", "content": SUMMARY_PROMPT}],
        "stream": False,
    }


def compacted_body(body: dict[str, Any], summary: str) -> dict[str, Any]:
    """``body`` continued from ``summary``: its system messages, one user message with the
    summary, then its last unit."""
    messages = body.get("messages") or []
    n, spans = units(messages)
    if not spans:
        return body
    summary_message = {"role": "user", "content": SUMMARY_PREFIX + summary}
    return {**body, "messages": [*messages[:n], summary_message, *messages[spans[-1][0]:]]}
