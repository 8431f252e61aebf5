"""The response loop: model call → server-side tool calls → model call → … → answer.

``run_response_loop`` drives one loop level (the top level of a response, or one sub-agent run)
from its chain in the store: it asks :func:`gateway.engine.transition.next_action` what to do, records
the new steps *before* running them, runs sibling steps concurrently, writes each outcome, and
repeats. It follows the seed ``response_loop.rs`` with its known faults fixed (real ``call_id``s,
scopes kept apart, resumable from any process because the request lives in the store).

Failure rules (DESIGN.md): an executor error — upstream failure, tool failure, depth cap — fails
its step and the loop goes on (the transition function decides what that means); a store error
propagates and stops the loop; an empty AppendSteps is a programming error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from executors.http_tool import HTTPToolExecutor, ToolError
from executors.mcp_tool import MCPServer, MCPToolExecutor
from executors.reassembly import Delta
from executors.registry import ToolRegistry
from executors.resilience import ResilientUpstream
from executors.upstream import UpstreamError
from gateway.errors import GatewayError
from gateway.observe.hooks import Observer
from gateway.protocol.context_window import is_compaction_request
from store.base import Store
from store.types import COMPLETED, MODEL_CALL, PENDING, PROCESSING, Step, StoreError

from .transition import (
    REJECTED_KEY,
    AppendSteps,
    Complete,
    Fail,
    Incomplete,
    LoopRequest,
    next_action,
)

logger = logging.getLogger("stepchain.loop")

__all__ = [
    "EmptyActionError",
    "LoopDeps",
    "LoopObserver",
    "LoopOutcome",
    "StepBudget",
    "run_response_loop",
]


class EmptyActionError(GatewayError):
    """The transition function returned AppendSteps with no steps (a bug: 500)."""


class LoopObserver(Protocol):
    """What the loop reports while it runs (``gateway.protocol.events.ResponseBuilder`` implements it)."""

    def model_delta(self, step_id: str, delta: Delta) -> None: ...
    def model_call_finished(self, step: Step) -> None: ...
    def hold_events(self) -> None: ...
    def tool_call_started(self, step: Step) -> None: ...
    def tool_call_finished(self, step: Step) -> None: ...
    def add_usage(self, chat_usage: dict[str, Any] | None) -> None: ...


class StepBudget:
    """How many more steps one response may record, across all its scopes (setting
    ``max_response_steps``): the iteration cap is per loop level, so agent tools that fan out
    multiply it; this bounds the whole response."""

    __slots__ = ("remaining",)

    def __init__(self, limit: int, used: int = 0) -> None:
        self.remaining = limit - used

    def take(self, n: int) -> bool:
        """Reserve ``n`` steps; False (nothing reserved) if fewer are left."""
        if n > self.remaining:
            return False
        self.remaining -= n
        return True


_STEP_FIELDS = dataclasses.fields(Step)
_step_values = operator.attrgetter(*(f.name for f in _STEP_FIELDS))
_STEP_POSITIONAL = all(f.init for f in _STEP_FIELDS) and not hasattr(Step, "__post_init__")


def _step_copy(step: Step, **changes: Any) -> Step:
    """``dataclasses.replace(step, **changes)`` at a quarter of its cost (once per response)."""
    if not _STEP_POSITIONAL:
        return dataclasses.replace(step, **changes)
    done = Step(*_step_values(step))
    for name, value in changes.items():
        setattr(done, name, value)
    return done


@dataclass(slots=True)
class LoopDeps:
    """The shared things one response's loops run with (one set per gateway process)."""

    store: Store
    upstream: ResilientUpstream
    registry: ToolRegistry
    http_tools: HTTPToolExecutor
    mcp_tools: MCPToolExecutor | None = None
    # Per response: function name -> (the MCP server, its tool name) the model may call.
    mcp_routes: Mapping[str, tuple[MCPServer, str]] | None = None
    mcp_timeout_s: float = 30.0
    max_steps: int = 200
    # Per response (set by the service): the steps it may still record.
    step_budget: StepBudget | None = None
    max_iterations: int = 10
    max_depth: int = 8
    tool_output_max_bytes: int = 50_000
    tool_output_max_lines: int = 2_000
    # Metrics, logs, traces and prices (gateway.observe); None = none of them.
    observer: Observer | None = None


@dataclass(slots=True)
class LoopOutcome:
    """How one loop level ended: ``status`` is completed | incomplete | failed."""

    status: str
    chain: list[Step]
    error: dict[str, Any] | None = None
    incomplete_reason: str | None = None
    # The last model call, completed but not yet stored (see run_response_loop).
    unwritten: Step | None = None
    # Transitions that appended steps in this run (the first batch of a new response included).
    iterations: int = 0

    @property
    def final_text(self) -> str:
        """The text of the last model call (an agent tool's output)."""
        for step in reversed(self.chain):
            if step.kind == MODEL_CALL and step.response_payload:
                try:
                    return step.response_payload["choices"][0]["message"].get("content") or ""
                except (KeyError, IndexError, TypeError):
                    return ""
        return ""


async def run_response_loop(
    deps: LoopDeps,
    response_id: str,
    request: LoopRequest,
    *,
    scope_parent: str | None = None,
    depth: int = 0,
    observer: LoopObserver | None = None,
    started: Sequence[Step] | None = None,
    defer_final_write: bool = False,
) -> LoopOutcome:
    """Run one loop level of ``response_id`` until the transition function ends it.

    Resumes from the scope's existing chain: unfinished steps at its end are settled first
    (model calls and agent tools re-run; HTTP tools re-run only when registered ``idempotent``,
    otherwise they fail with ``interrupted``). ``started`` is instead the whole chain of a new
    response whose first steps were recorded with it (``Store.create_response``) and are to run
    now. ``observer`` receives top-level events; nested levels only report their usage to it.
    With ``defer_final_write`` (top level) a model call after which the transition function ends
    the loop is not written here: it comes back completed in :attr:`LoopOutcome.unwritten` for
    the caller to store with the response's result, in one transaction; the observer is told to
    hold its events about it (``hold_events``) until that write is done. Raises StoreError (the loop cannot go on) and EmptyActionError.
    """
    chain: list[Step] = []
    deferred: list[Step] = []
    ends_after = None
    if defer_final_write and depth == 0:

        def ends_after(done: Step) -> bool:
            return not isinstance(next_action(request, [*chain, done]), AppendSteps)

    iterations = 0
    if started is not None:
        iterations = 1
        chain = await _run_batch(deps, response_id, started, depth, observer, ends_after, deferred)
    else:
        chain = await deps.store.list_chain(response_id, scope_parent)
        unfinished = [s for s in chain if s.state in (PENDING, PROCESSING)]
        if unfinished:
            settled = await _run_batch(deps, response_id, unfinished, depth, observer, resume=True)
            by_id = {s.id: s for s in settled}
            chain = [by_id.get(s.id, s) for s in chain]
    prev = chain[-1].id if chain else None
    while True:
        action = next_action(request, chain)
        if isinstance(action, AppendSteps):
            if not action.steps:
                raise EmptyActionError("transition function returned AppendSteps with no steps")
            if deps.step_budget is not None and not deps.step_budget.take(len(action.steps)):
                unwritten = deferred[0] if deferred else None
                return LoopOutcome(
                    "incomplete", chain, incomplete_reason="max_steps_exceeded", unwritten=unwritten
                )
            steps = await deps.store.record_steps(
                response_id, scope_parent, prev, action.steps, start=True
            )
            prev = steps[-1].id
            iterations += 1
            chain.extend(
                await _run_batch(deps, response_id, steps, depth, observer, ends_after, deferred)
            )
            continue
        unwritten = deferred[0] if deferred else None
        if isinstance(action, Complete):
            return LoopOutcome("completed", chain, unwritten=unwritten, iterations=iterations)
        if isinstance(action, Incomplete):
            return LoopOutcome(
                "incomplete", chain, incomplete_reason=action.reason, unwritten=unwritten,
                iterations=iterations,
            )
        if isinstance(action, Fail):
            return LoopOutcome(
                "failed", chain, error=action.error, unwritten=unwritten, iterations=iterations
            )
        raise TypeError(f"unknown action {action!r}")  # pragma: no cover - the union is closed


async def _run_batch(
    deps: LoopDeps,
    response_id: str,
    steps: Sequence[Step],
    depth: int,
    observer: LoopObserver | None,
    ends_after: Callable[[Step], bool] | None = None,
    deferred: list[Step] | None = None,
    *,
    resume: bool = False,
) -> list[Step]:
    """Run sibling steps concurrently; a store error in any of them cancels the rest."""
    if len(steps) == 1:  # the common case: no task overhead (and the only one that defers)
        return [
            await _execute_step(
                deps, response_id, steps[0], depth, observer, resume, ends_after, deferred
            )
        ]
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(_execute_step(deps, response_id, s, depth, observer, resume))
            for s in steps
        ]
    return [t.result() for t in tasks]


async def _execute_step(
    deps: LoopDeps,
    response_id: str,
    step: Step,
    depth: int,
    observer: LoopObserver | None,
    resume: bool,
    ends_after: Callable[[Step], bool] | None = None,
    deferred: list[Step] | None = None,
) -> Step:
    watch = deps.observer
    if watch is None:
        return await _run_step(
            deps, response_id, step, depth, observer, resume, ends_after, deferred
        )
    with watch.step(step) as scope:  # its span is current while it runs
        done = await _run_step(deps, response_id, step, depth, observer, resume, ends_after, deferred)
        scope.finish(done)
        return done


async def _run_step(
    deps: LoopDeps,
    response_id: str,
    step: Step,
    depth: int,
    observer: LoopObserver | None,
    resume: bool,
    ends_after: Callable[[Step], bool] | None = None,
    deferred: list[Step] | None = None,
) -> Step:
    store = deps.store
    top = observer if depth == 0 else None
    if step.state == PENDING:
        step = await store.mark_processing(step.id)
    elif resume:
        # Interrupted while processing (the process died): note it, then run it again if safe.
        await store.record_attempt(step.id, {"type": "interrupted", "message": "process stopped"})
        if step.kind != MODEL_CALL and not _safe_to_rerun(deps, step):
            return await store.fail_step(
                step.id,
                {"type": "interrupted", "message": "the tool call was interrupted and is not idempotent"},
            )

    if step.kind == MODEL_CALL:
        if top is not None and is_compaction_request(step.request_payload):
            # A compaction step is no output of the response: only its usage counts.
            return await _model_call(deps, step, None, observer)
        return await _model_call(deps, step, top, observer, ends_after, deferred)

    if top is not None:
        top.tool_call_started(step)
    try:
        output = await _tool_call(deps, response_id, step, depth, observer)
    except ToolError as exc:
        step = await store.fail_step(step.id, {"type": exc.type, "message": exc.message})
    else:
        step = await store.complete_step(step.id, output)
    if top is not None:
        top.tool_call_finished(step)
    return step


def _safe_to_rerun(deps: LoopDeps, step: Step) -> bool:
    if step.request_payload.get(REJECTED_KEY):
        return True  # never runs anyway
    if deps.mcp_routes and step.request_payload.get("name") in deps.mcp_routes:
        return False  # an MCP tool may have side effects
    definition = deps.registry.lookup(step.request_payload.get("name", ""))
    if definition is None:
        return True  # it will fail as unknown again, harmlessly
    return definition.get("kind") == "agent" or bool(definition.get("idempotent"))


async def _model_call(
    deps: LoopDeps,
    step: Step,
    top: LoopObserver | None,
    observer: LoopObserver | None,
    ends_after: Callable[[Step], bool] | None = None,
    deferred: list[Step] | None = None,
) -> Step:
    on_delta = None
    if top is not None:
        step_id = step.id
        model_delta = top.model_delta

        first = True

        async def on_delta(delta: Delta) -> None:
            nonlocal first
            model_delta(step_id, delta)
            if first:
                # A fast upstream delivers many chunks in one read; without a pause here the
                # client's first bytes would wait until all of them had been processed.
                first = False
                await asyncio.sleep(0)

    step_id_ = step.id
    store = deps.store
    answered_by: list[str] = []
    watch = deps.observer
    attempts = 0
    step_ = step

    async def on_attempt(error: dict[str, Any] | None, upstream: str) -> None:
        nonlocal attempts
        if watch is not None:
            attempts += 1
            watch.attempt(step_, error, upstream, attempts)
        if error is None:
            answered_by.append(upstream)  # written with the completion: no extra round trip
        else:
            await store.record_attempt(step_id_, error, upstream)

    try:
        completion = await deps.upstream.chat_completion(
            step.request_payload, on_delta=on_delta, on_attempt=on_attempt
        )
    except UpstreamError as exc:
        error = {"type": exc.type, "message": str(exc)}
        if exc.status is not None:
            error["status"] = exc.status
        upstream_error = exc.body.get("error") if isinstance(exc.body, dict) else None
        if isinstance(upstream_error, dict):  # the upstream's own code and param, for its 4xx
            for key in ("code", "param"):
                if isinstance(upstream_error.get(key), str):
                    error[key] = upstream_error[key]
        step = await deps.store.fail_step(step.id, error, exc.partial)
        if top is not None:
            top.model_call_finished(step)
        return step
    usage = completion.get("usage") if isinstance(completion, dict) else None
    if watch is not None:
        usage = watch.priced(step, usage)  # its cost, stored with it
    upstream = answered_by[-1] if answered_by else None
    if ends_after is not None and deferred is not None:
        done = _step_copy(
            step, state=COMPLETED, response_payload=completion, usage=usage,
            finished_at=time.time(), upstream=upstream or step.upstream,
        )
        if ends_after(done):  # the caller stores it with the response's result
            deferred.append(done)
            if top is not None:
                top.hold_events()  # its events wait for that write
                top.model_call_finished(done)
            return done
    step = await deps.store.complete_step(step.id, completion, usage, upstream=upstream)
    if top is not None:
        top.model_call_finished(step)
    elif observer is not None:
        observer.add_usage(usage)
    return step


async def _tool_call(
    deps: LoopDeps, response_id: str, step: Step, depth: int, observer: LoopObserver | None
) -> Any:
    """Run one tool step; raises ToolError with the message the model will see."""
    payload = step.request_payload
    name = payload.get("name", "")
    if payload.get(REJECTED_KEY) == "max_tool_calls":
        raise ToolError("max_tool_calls_exceeded", "max_tool_calls reached: this call was not run")
    if payload.get(REJECTED_KEY) == "denied":
        reason = payload.get("reason")
        raise ToolError(
            "approval_denied",
            "the user denied this tool call" + (f": {reason}" if isinstance(reason, str) and reason else ""),
        )
    route = deps.mcp_routes.get(name) if deps.mcp_routes and depth == 0 else None
    if route is not None and deps.mcp_tools is not None:
        server, tool_name = route
        return await deps.mcp_tools.call(server, tool_name, payload.get("arguments") or "")
    definition = deps.registry.lookup(name)
    if definition is None:
        raise ToolError("unknown_tool", f"unknown tool: {name}")
    if definition.get("kind") == "agent":
        return await _agent_call(deps, response_id, step, definition, depth, observer)
    return await deps.http_tools.call(
        definition, payload.get("arguments") or "",
        idempotency_key=step.id, call_id=payload.get("call_id"),
    )


async def _agent_call(
    deps: LoopDeps,
    response_id: str,
    step: Step,
    definition: dict[str, Any],
    depth: int,
    observer: LoopObserver | None,
) -> Any:
    """Run a sub-agent as a nested loop in the scope of this tool step; its final text is the output."""
    if depth + 1 > deps.max_depth:
        raise ToolError(
            "max_depth_exceeded",
            f"agent tool {definition['name']!r} not run: max_response_step_depth "
            f"({deps.max_depth}) reached",
        )
    raw = step.request_payload.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ToolError("invalid_arguments", f"arguments are not valid JSON: {exc}") from exc
    if isinstance(arguments, dict) and isinstance(arguments.get("input"), str) and len(arguments) == 1:
        user_text = arguments["input"]
    else:
        user_text = raw
    tools = []
    for tool_name in definition.get("tools") or []:
        tool = deps.registry.lookup(tool_name)
        if tool is not None:
            tools.append(
                {
                    "type": "function",
                    "function": {
                        "name": tool["name"],
                        "description": tool.get("description") or "",
                        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
                    },
                }
            )
    messages: list[dict[str, Any]] = []
    if definition.get("instructions"):
        messages.append({"role": "system", "content": definition["instructions"]})
    messages.append({"role": "user", "content": user_text})
    body: dict[str, Any] = {"model": definition["model"], "messages": messages}
    if tools:
        body["tools"] = tools
    request = LoopRequest(
        initial_body=body,
        max_iterations=deps.max_iterations,
        tool_output_max_bytes=deps.tool_output_max_bytes,
        tool_output_max_lines=deps.tool_output_max_lines,
    )
    watch = deps.observer
    try:
        if watch is None:
            outcome = await run_response_loop(
                deps, response_id, request, scope_parent=step.id, depth=depth + 1, observer=observer
            )
        else:
            with watch.agent(definition["name"], definition["model"]):
                outcome = await run_response_loop(
                    deps, response_id, request, scope_parent=step.id, depth=depth + 1,
                    observer=observer,
                )
    except StoreError:
        raise
    if outcome.status == "failed":
        message = (outcome.error or {}).get("message") or "sub-agent failed"
        raise ToolError("agent_failed", f"agent tool {definition['name']!r} failed: {message}")
    if outcome.status == "incomplete":
        raise ToolError(
            "agent_incomplete",
            f"agent tool {definition['name']!r} stopped early: {outcome.incomplete_reason}",
        )
    return outcome.final_text
