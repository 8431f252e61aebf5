"""The step chain in a terminal (``stepchain trace`` and ``stepchain responses``), with rich.

Pure rendering: store records in, rich renderables out. Times are shown as offsets from the
response's start and durations in ms or s; cost in USD (``—`` when unknown: no price configured).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from store.types import MODEL_CALL, ResponseRecord, Step

from .chain import response_summary, step_cost, step_label, step_tokens, step_tree

__all__ = ["responses_table", "trace_tree"]

_STATE_STYLE = {
    "completed": "green", "failed": "red", "canceled": "yellow", "cancelled": "yellow",
    "processing": "cyan", "in_progress": "cyan", "queued": "cyan", "pending": "dim",
    "incomplete": "yellow",
}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_cost(cost: float | None) -> str:
    if cost is None:
        return "—"
    return f"${cost:.6f}".rstrip("0").rstrip(".") if cost else "$0"


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _step_line(step: Step, t0: float) -> Text:
    line = Text()
    kind = "model" if step.kind == MODEL_CALL else "tool"
    line.append(f"{kind:5} ", style="magenta" if kind == "model" else "yellow")
    line.append(step_label(step).removeprefix("model_call ") if kind == "model" else step_label(step),
                style="bold")
    line.append("  ")
    line.append(step.state, style=_STATE_STYLE.get(step.state, ""))
    start = step.started_at if step.started_at is not None else step.created_at
    duration = None if step.finished_at is None or step.started_at is None else step.finished_at - step.started_at
    line.append(f"  +{fmt_duration(max(start - t0, 0.0))}", style="dim")
    line.append(f"  {fmt_duration(duration)}")
    if step.kind == MODEL_CALL and step.usage is not None:
        inputs, outputs = step_tokens(step)
        line.append(f"  {inputs}→{outputs} tok  {fmt_cost(step_cost(step.usage))}", style="dim")
    if step.attempts:
        line.append(f"  ↻{len(step.attempts)}", style="bold red")
    if step.error:
        message = str(step.error.get("message") or step.error.get("type") or "")[:120]
        line.append(f"  {message}", style="red")
    return line


def trace_tree(record: ResponseRecord, steps: Sequence[Step]) -> Tree:
    """The response as a tree: its steps by sequence, each sub-agent's steps under its agent
    tool step; each line: kind, model or tool, state, start offset, duration, tokens, cost."""
    summary = response_summary(record, steps)
    head = Text()
    head.append(record.id, style="bold")
    head.append(f"  {record.status}", style=_STATE_STYLE.get(record.status, ""))
    head.append(f"  {record.model}  {_when(record.created_at)}  {fmt_duration(summary['duration_s'])}")
    head.append(
        f"  {summary['steps']} steps  {summary['input_tokens']}→{summary['output_tokens']} tok"
        f"  {fmt_cost(summary['cost_usd'])}",
        style="dim",
    )
    tree = Tree(head)
    t0 = min([s.started_at or s.created_at for s in steps] or [record.created_at])

    def add(node: Tree, branch: list[tuple[Step, list[Any]]]) -> None:
        for step, children in branch:
            child = node.add(_step_line(step, t0))
            add(child, children)

    add(tree, step_tree(steps))
    if not steps:
        tree.add(Text("no steps recorded", style="dim"))
    return tree


def responses_table(rows: Sequence[tuple[ResponseRecord, Sequence[Step]]], *, with_tenant: bool) -> Table:
    """Recent responses: time, id, status, model, [tenant], steps, tokens, cost, duration."""
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("time", no_wrap=True)
    table.add_column("response", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("model")
    if with_tenant:
        table.add_column("tenant")
    for column in ("steps", "tokens", "cost", "duration"):
        table.add_column(column, justify="right", no_wrap=True)
    for record, steps in rows:
        s = response_summary(record, steps)
        cells = [
            _when(record.created_at), record.id,
            Text(record.status, style=_STATE_STYLE.get(record.status, "")), record.model,
        ]
        if with_tenant:
            cells.append(record.tenant or "—")
        cells += [str(s["steps"]), str(s["total_tokens"]), fmt_cost(s["cost_usd"]),
                  fmt_duration(s["duration_s"])]
        table.add_row(*cells)
    return table
