"""A response and its step chain, summed up for people: duration, tokens, cost, step tree.

Used by the trace viewer's listing (:mod:`gateway.http.ui`) and the terminal trace
(``stepchain trace``). Pure functions over store records; times are Unix seconds, durations
seconds, costs USD (None = unknown, see :mod:`gateway.observe.cost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from store.types import MODEL_CALL, ResponseRecord, Step

from .cost import step_cost, sum_costs

__all__ = [
    "response_summary",
    "step_cost",
    "step_duration",
    "step_label",
    "step_tokens",
    "step_tree",
]


def step_label(step: Step) -> str:
    """``model_call gpt-4o`` / the tool's name (``tool_call`` if it has none)."""
    payload = step.request_payload if isinstance(step.request_payload, dict) else {}
    if step.kind == MODEL_CALL:
        return f"model_call {payload.get('model') or ''}".rstrip()
    return str(payload.get("name") or "tool_call")


def step_tokens(step: Step) -> tuple[int, int]:
    """(input, output) tokens of a model call's Chat Completions usage; (0, 0) otherwise."""
    usage = step.usage if isinstance(step.usage, dict) else None
    if usage is None:
        return 0, 0
    inputs = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    outputs = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (inputs if isinstance(inputs, int) else 0, outputs if isinstance(outputs, int) else 0)


def step_duration(step: Step) -> float | None:
    if step.started_at is None or step.finished_at is None:
        return None
    return max(step.finished_at - step.started_at, 0.0)


def response_summary(
    record: ResponseRecord, steps: Sequence[Step], *, with_tenant: bool = False
) -> dict[str, Any]:
    """One row of a listing: ``{id, created_at, completed_at, duration_s, status, model,
    previous_response_id, steps, model_calls, tool_calls, input_tokens, output_tokens,
    total_tokens, cost_usd[, tenant]}`` — tokens and cost summed over every model call of
    every scope (so an in-progress response shows what it has used so far)."""
    inputs = outputs = model_calls = 0
    for step in steps:
        if step.kind == MODEL_CALL:
            model_calls += 1
            i, o = step_tokens(step)
            inputs += i
            outputs += o
    cost = sum_costs(s.usage for s in steps if s.kind == MODEL_CALL)
    duration = None
    if record.completed_at is not None:
        duration = max(record.completed_at - record.created_at, 0.0)
    row: dict[str, Any] = {
        "id": record.id,
        "object": "response.summary",
        "created_at": record.created_at,
        "completed_at": record.completed_at,
        "duration_s": duration,
        "status": record.status,
        "model": record.model,
        "previous_response_id": record.previous_response_id,
        "steps": len(steps),
        "model_calls": model_calls,
        "tool_calls": len(steps) - model_calls,
        "input_tokens": inputs,
        "output_tokens": outputs,
        "total_tokens": inputs + outputs,
        "cost_usd": cost,
    }
    if with_tenant:
        row["tenant"] = record.tenant
    return row


def step_tree(steps: Sequence[Step]) -> list[tuple[Step, list[Any]]]:
    """The steps as a tree: top-level steps by sequence, each ``(step, children)`` where the
    children are the sub-agent scope an agent tool step started (nested the same way)."""
    by_parent: dict[str | None, list[Step]] = {}
    for step in sorted(steps, key=lambda s: s.sequence):
        by_parent.setdefault(step.scope_parent, []).append(step)

    def build(parent: str | None, depth: int) -> list[tuple[Step, list[Any]]]:
        if depth > 64:
            return []
        return [(s, build(s.id, depth + 1)) for s in by_parent.get(parent, [])]

    return build(None, 0)

