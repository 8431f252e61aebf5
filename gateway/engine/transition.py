"""The transition function: what happens next, decided from the request and the chain alone.

``next_action(request, chain)`` is pure — no I/O, no clock, no randomness — so the same chain
always gives the same decision, in this process or in another one resuming the response after a
crash. It follows DESIGN.md ("The transition function"):

* empty chain → one model call built from the request;
* the last model call failed → :class:`Fail` with its error;
* the last model call asked for tools → one tool step per server-side call, in the model's order
  and keyed by the model's own ``call_id``; calls of client function tools are not steps — the
  response completes with ``function_call`` items once the server-side calls of that turn ran;
* the last batch of tool steps finished → a follow-up model call whose messages are the previous
  call's messages + the assistant message with its ``tool_calls`` + one ``tool`` message per call,
  matched by ``call_id`` (a failed tool's error text is its message, so the model can recover);
* the last model call asked for no tools → :class:`Complete`.

Approvals: calls of tools in ``approval_tools`` are not run; like client tool calls they end the
response (with ``mcp_approval_request`` items) once the other calls of that turn ran. A follow-up
that answers them carries them in ``approved_calls``: its chain starts with their tool steps
(denied ones are failed by the loop without running, see ``REJECTED_KEY``), then a model call whose
messages are ``initial_body``'s (which end with the assistant message asking for those calls) +
one ``tool`` message per call.

A **batch** is one AppendSteps transition: a model call, or the tool steps of one model turn.
``max_iterations`` caps the batches of one loop level; at the cap the response is
:class:`Incomplete` with reason ``max_iterations_exceeded``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError
from gateway.protocol.context_window import (
    compacted_body,
    compaction_request,
    estimate_tokens,
    is_compaction_request,
    truncate_messages,
)
from gateway.protocol.truncation import tool_output_text, truncate_for_model
from store.types import (
    CANCELED,
    COMPLETED,
    FAILED,
    FINISHED_STATES,
    MODEL_CALL,
    TOOL_CALL,
    Step,
    StepDescriptor,
)

__all__ = [
    "AppendSteps",
    "ChainNotSettledError",
    "Complete",
    "Fail",
    "Incomplete",
    "LoopRequest",
    "next_action",
    "tool_message_content",
]


@dataclass(frozen=True, slots=True)
class LoopRequest:
    """What one loop level needs to decide its transitions.

    ``initial_body`` is the Chat Completions body of the first model call (messages, tools,
    sampling options, ``stream``). ``client_tools`` are the names of function tools the client
    runs itself; every other tool name the model calls gets a server-side step (an unknown name
    fails that step with ``unknown tool: NAME``, so the model can recover).
    """

    initial_body: dict[str, Any]
    client_tools: frozenset[str] = frozenset()
    # Function names whose calls wait for the client's approval (mcp_approval_request).
    approval_tools: frozenset[str] = frozenset()
    # Calls the client answered with mcp_approval_response: {"name", "call_id", "arguments",
    # "approved": bool, "approval_request_id"}; run (or refused) before the first model call.
    approved_calls: tuple[dict[str, Any], ...] = ()
    max_iterations: int = 10
    max_tool_calls: int | None = None
    tool_output_max_bytes: int = 50_000
    tool_output_max_lines: int = 2_000
    # Context management (``context_window``: the model's size in tokens, None = unknown):
    # ``truncation: "auto"`` drops the oldest messages to fit it, and once more after an
    # upstream ``context_length_exceeded``; past ``compact_threshold`` estimated tokens a
    # compaction step (a summary model call) comes before the model call.
    context_window: int | None = None
    truncation: bool = False
    compact_threshold: int | None = None


@dataclass(frozen=True, slots=True)
class Complete:
    """The response is done; its output is derived from the chain."""


@dataclass(frozen=True, slots=True)
class Fail:
    """The response failed; ``error`` is ``{"type", "message"}`` of the failed step."""

    error: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Incomplete:
    """The response stopped early; ``reason`` is the Responses ``incomplete_details.reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class AppendSteps:
    """Record these steps (chained in this order) and run them concurrently."""

    steps: tuple[StepDescriptor, ...] = field(default_factory=tuple)


Action = Complete | Fail | Incomplete | AppendSteps


class ChainNotSettledError(GatewayError, ValueError):
    """The chain ends in a step that is still pending or processing; settle it first (a bug
    if it reaches a client: 500)."""


# Marks a tool step that the loop must fail without running (the max_tool_calls cap).
REJECTED_KEY = "rejected"


def _batches(chain: Sequence[Step]) -> list[list[Step]]:
    """Split a chain into its batches: each model call alone, consecutive tool steps together."""
    batches: list[list[Step]] = []
    for step in chain:
        if step.kind == TOOL_CALL and batches and batches[-1][0].kind == TOOL_CALL:
            batches[-1].append(step)
        else:
            batches.append([step])
    return batches


def _message(completion: Any) -> dict[str, Any]:
    try:
        return completion["choices"][0]["message"] or {}
    except (KeyError, IndexError, TypeError):
        return {}


def _finish_reason(completion: Any) -> str | None:
    try:
        return completion["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _tool_calls(completion: Any) -> list[dict[str, Any]]:
    return _message(completion).get("tool_calls") or []


def tool_message_content(step: Step, *, max_bytes: int, max_lines: int) -> str:
    """The ``tool`` message text the model sees for a finished tool step.

    Completed: the output as text, truncated past ``max_bytes`` / ``max_lines`` with a marker (the
    full output stays in the store). Failed or canceled: ``"Error: <message>"``.
    """
    if step.state == COMPLETED:
        return truncate_for_model(
            tool_output_text(step.response_payload), max_bytes=max_bytes, max_lines=max_lines
        )
    if step.state == CANCELED:
        return "Error: the tool call was canceled"
    message = (step.error or {}).get("message") or "the tool call failed"
    return f"Error: {message}"


def _follow_up(request: LoopRequest, model_step: Step, tool_steps: Sequence[Step]) -> dict[str, Any]:
    """The next model call: previous messages + assistant tool_calls + one tool message per call."""
    message = _message(model_step.response_payload)
    calls = _tool_calls(model_step.response_payload)
    by_call_id = {s.request_payload["call_id"]: s for s in tool_steps}
    assistant: dict[str, Any] = {
        "role": "assistant",
        "content": message.get("content"),
        "tool_calls": [
            {
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": call["function"].get("arguments") or "",
                },
            }
            for call in calls
        ],
    }
    messages = list(model_step.request_payload["messages"])
    messages.append(assistant)
    for call in calls:
        step = by_call_id[call["id"]]
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "content": tool_message_content(
                    step,
                    max_bytes=request.tool_output_max_bytes,
                    max_lines=request.tool_output_max_lines,
                ),
            }
        )
    body = dict(model_step.request_payload)
    body["messages"] = messages
    return body


def _approved_steps(request: LoopRequest) -> AppendSteps:
    descriptors = []
    for call in request.approved_calls:
        payload = {
            "name": call["name"],
            "call_id": call["call_id"],
            "arguments": call.get("arguments") or "",
            "approval_request_id": call.get("approval_request_id") or call["call_id"],
        }
        if not call.get("approved"):
            payload[REJECTED_KEY] = "denied"
            if call.get("reason"):
                payload["reason"] = call["reason"]
        descriptors.append(StepDescriptor(TOOL_CALL, payload))
    return AppendSteps(tuple(descriptors))


def _after_approved(request: LoopRequest, tool_steps: Sequence[Step]) -> dict[str, Any]:
    """The first model call of a response that ran approved calls: their tool messages follow
    the initial body's messages (which end with the assistant message asking for them)."""
    by_call_id = {s.request_payload["call_id"]: s for s in tool_steps}
    messages = list(request.initial_body["messages"])
    for call in request.approved_calls:
        step = by_call_id[call["call_id"]]
        content = tool_message_content(
            step, max_bytes=request.tool_output_max_bytes, max_lines=request.tool_output_max_lines
        )
        messages.append({"role": "tool", "tool_call_id": call["call_id"], "content": content})
    return {**request.initial_body, "messages": messages}


#: The step error type of an upstream that found the prompt longer than its context window.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def _fit(request: LoopRequest, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` truncated to the context window (``truncation: "auto"`` with a known window),
    leaving room for the reply (``max_tokens``, else an eighth of the window)."""
    if not request.truncation or request.context_window is None:
        return body
    reserve = body.get("max_tokens") or request.context_window // 8
    return truncate_messages(body, max(request.context_window - reserve, 1))


def _model_call(request: LoopRequest, body: dict[str, Any], *, compacted: bool = False) -> Action:
    """Append the model call ``body`` — or first a compaction step when it is over the
    threshold (not again right after one)."""
    if (
        request.compact_threshold is not None
        and not compacted
        and estimate_tokens(body) > request.compact_threshold
    ):
        summary = compaction_request(body)
        if summary is not None:
            return AppendSteps((StepDescriptor(MODEL_CALL, summary),))
    return AppendSteps((StepDescriptor(MODEL_CALL, _fit(request, body)),))


def _pending_body(request: LoopRequest, batches: list[list[Step]]) -> dict[str, Any]:
    """The model call a compaction step was made for: the first one, or the follow-up of the
    tool batch before it."""
    if not batches:
        return request.initial_body
    if len(batches) == 1 and batches[0][0].kind == TOOL_CALL:
        return _after_approved(request, batches[0])
    return _follow_up(request, batches[-2][0], batches[-1])


def _after_context_step(request: LoopRequest, batches: list[list[Step]], step: Step) -> Action | None:
    """The transition after a compaction step, or after a model call the upstream refused as
    too long (retried once, truncated, with ``truncation: "auto"``); None otherwise."""
    if is_compaction_request(step.request_payload):
        body = _pending_body(request, batches[:-1])
        if step.state == COMPLETED:
            summary = (_message(step.response_payload).get("content") or "").strip()
            if summary:
                body = compacted_body(body, summary)
        # A failed summary is no reason to fail the response: go on uncompacted.
        return _model_call(request, body, compacted=True)
    error = step.error or {}
    if step.state == FAILED and error.get("type") == CONTEXT_LENGTH_EXCEEDED and request.truncation:
        retried = len(batches) > 1 and (batches[-2][0].error or {}).get("type") == CONTEXT_LENGTH_EXCEEDED
        if not retried:
            body = step.request_payload
            budget = estimate_tokens(body) * 3 // 4
            if request.context_window is not None:
                budget = min(budget, request.context_window - (body.get("max_tokens") or 0))
            shorter = truncate_messages(body, max(budget, 1))
            if shorter is not body:
                return AppendSteps((StepDescriptor(MODEL_CALL, shorter),))
    return None


def next_action(request: LoopRequest, chain: Sequence[Step]) -> Action:
    """Decide the next transition of one loop level from its chain.

    ``chain`` is the steps of one scope in ``sequence`` order (``Store.list_chain``). Raises
    :class:`ChainNotSettledError` if its last batch has a step still pending or processing.
    """
    if not chain:
        if request.approved_calls:
            return _approved_steps(request)
        return _model_call(request, request.initial_body)
    batches = _batches(chain)
    last = batches[-1]
    for step in last:
        if step.state not in FINISHED_STATES:
            raise ChainNotSettledError(f"step {step.id} is still {step.state}")
    # Compaction steps and truncated retries do not count against the iteration cap.
    at_cap = len(batches) >= request.max_iterations + _context_batches(batches)

    if last[0].kind == MODEL_CALL:
        step = last[0]
        if request.compact_threshold is not None or request.truncation:
            action = _after_context_step(request, batches, step)
            if action is not None:
                return action
        if step.state == FAILED:
            return Fail(step.error or {"type": "model_call_failed", "message": "model call failed"})
        if step.state == CANCELED:
            return Fail({"type": "cancelled", "message": "the model call was canceled"})
        calls = _tool_calls(step.response_payload)
        if not calls:
            reason = _finish_reason(step.response_payload)
            if reason == "length":
                return Incomplete("max_output_tokens")
            if reason == "content_filter":
                return Incomplete("content_filter")
            return Complete()
        server_calls = [
            c
            for c in calls
            if c["function"]["name"] not in request.client_tools
            and c["function"]["name"] not in request.approval_tools
        ]
        if not server_calls:
            return Complete()
        if at_cap:
            return Incomplete("max_iterations_exceeded")
        used = sum(len(b) for b in batches if b[0].kind == TOOL_CALL)
        descriptors = []
        for call in server_calls:
            payload = {
                "name": call["function"]["name"],
                "call_id": call["id"],
                "arguments": call["function"].get("arguments") or "",
            }
            if request.max_tool_calls is not None and used >= request.max_tool_calls:
                payload[REJECTED_KEY] = "max_tool_calls"
            used += 1
            descriptors.append(StepDescriptor(TOOL_CALL, payload))
        return AppendSteps(tuple(descriptors))

    if len(batches) == 1:
        # The approved calls a follow-up started with: now the first model call.
        if at_cap:
            return Incomplete("max_iterations_exceeded")
        return _model_call(request, _after_approved(request, last))
    # The last batch is the finished tool steps of the model call just before it.
    model_step = batches[-2][0]
    calls = _tool_calls(model_step.response_payload)
    waiting = request.client_tools | request.approval_tools
    if any(c["function"]["name"] in waiting for c in calls):
        # Mixed turn: the server-side calls ran; the client answers the rest.
        return Complete()
    if at_cap:
        return Incomplete("max_iterations_exceeded")
    return _model_call(request, _follow_up(request, model_step, last))


def _context_batches(batches: list[list[Step]]) -> int:
    """Model-call batches that only managed the context: compaction steps and calls the
    upstream refused as too long."""
    return sum(
        1
        for b in batches
        if b[0].kind == MODEL_CALL
        and (
            is_compaction_request(b[0].request_payload)
            or (b[0].error or {}).get("type") == CONTEXT_LENGTH_EXCEEDED
        )
    )
