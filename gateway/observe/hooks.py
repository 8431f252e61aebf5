"""The one hook point the engine calls while a response runs; it fans out to the metrics, the
structured event log, OpenTelemetry spans and the cost of each model call.

    with observer.response(record, ...) as r:       # service: a response from start to end
        ...                                         #   r.finish(status, usage, error, iterations)
    with observer.step(step) as s:                  # loop: each step, any scope
        usage = observer.priced(step, usage)        #   a model call's usage, with its cost
        observer.attempt(step, error, upstream, n)  #   each upstream attempt of a model call
        s.finish(step)                              #   its final state
    with observer.agent(name, model):               # loop: a sub-agent's nested run

Scopes are context managers so a span is current while its step runs (nested sub-agents and the
``traceparent`` sent upstream and to tools follow it). Without tracing, a scope costs an object
and a few counter increments on pre-bound label children.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Mapping
from typing import Any

from store.types import MODEL_CALL, ResponseRecord, Step

from .cost import PriceTable, step_cost
from .logs import event_logger
from .metrics import Metrics, status_class
from .tracing import Tracing

__all__ = ["Observer", "ResponseScope", "StepScope"]


# The response whose loop is running in this task (and the tasks it starts): its steps' tenant
# and running cost come from here.
_CURRENT: contextvars.ContextVar[ResponseScope | None] = contextvars.ContextVar(
    "stepchain_response_scope", default=None
)


def _tokens(usage: Mapping[str, Any] | None) -> tuple[int, int]:
    if not isinstance(usage, dict) and not isinstance(usage, Mapping):
        return 0, 0
    i = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    o = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (i if isinstance(i, int) else 0, o if isinstance(o, int) else 0)


class Observer:
    """Metrics, event log, tracing and prices for one gateway process (any may be off)."""

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        prices: PriceTable | None = None,
        tracing: Tracing | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.metrics = metrics
        self.prices = prices or PriceTable()
        self.tracing = tracing
        self.log = log or event_logger()

    def _logs(self) -> bool:
        return self.log.isEnabledFor(logging.INFO)

    # -- responses ---------------------------------------------------------------------------

    def response(
        self, record: ResponseRecord, *, conversation_id: str | None = None,
        parent_headers: Mapping[str, str] | None = None,
    ) -> ResponseScope:
        return ResponseScope(self, record, conversation_id, parent_headers)

    # -- steps -------------------------------------------------------------------------------

    def step(self, step: Step) -> StepScope:
        return StepScope(self, step)

    def priced(self, step: Step, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """A model call's Chat Completions usage with its cost (USD, None if the model has no
        price) under ``usage["stepchain"]["cost_usd"]``; None stays None."""
        if usage is None:
            return None
        return self.prices.annotate(_model(step), usage)

    def attempt(
        self, step: Step, error: Mapping[str, Any] | None, upstream: str, number: int
    ) -> None:
        """One finished attempt of a model call (``number`` from 1) at ``upstream``."""
        m = self.metrics
        status = error.get("status") if error else 200
        klass = status_class(status if isinstance(status, int) else None)
        if m is not None:
            label = m.upstreams(upstream)
            m.child(m.attempts, label, klass).inc()
            if error is not None:
                m.child(m.errors, label, klass).inc()
            if number > 1:
                m.child(m.retries, label).inc()
        if error is not None and self._logs():
            self.log.info(
                "upstream attempt failed",
                extra={
                    "event": "upstream.retry", "response_id": step.response_id, "step_id": step.id,
                    "tenant": _tenant(), "upstream": upstream, "status": status,
                    "error_type": error.get("type"), "attempt": number,
                },
            )

    def agent(self, name: str, model: str, conversation_id: str | None = None) -> AgentScope:
        return AgentScope(self.tracing, name, model, conversation_id)


def _tenant() -> str | None:
    scope = _CURRENT.get()
    return None if scope is None else scope.record.tenant


def _model(step: Step) -> str | None:
    payload = step.request_payload if isinstance(step.request_payload, dict) else {}
    model = payload.get("model")
    return str(model) if model else None


class ResponseScope:
    """A response from start to end: in-flight gauge, final status, iterations, span, logs."""

    __slots__ = ("obs", "record", "conversation_id", "parent_headers", "start", "span", "token",
                 "finished", "cost", "var_token")

    def __init__(self, obs: Observer, record: ResponseRecord, conversation_id: str | None,
                 parent_headers: Mapping[str, str] | None) -> None:
        self.obs = obs
        self.record = record
        self.conversation_id = conversation_id
        self.parent_headers = parent_headers
        self.span = self.token = None
        self.finished = False
        self.cost: float | None = 0.0  # None once a model call's cost is unknown

    def add_cost(self, usage: Mapping[str, Any] | None, cost: float | None = None) -> None:
        """Add a model call's cost (``cost``: ``step_cost(usage)`` when the caller has it)."""
        if usage is None or self.cost is None:
            return
        if cost is None:
            cost = step_cost(usage)
        self.cost = None if cost is None else self.cost + cost

    def __enter__(self) -> ResponseScope:
        self.start = time.perf_counter()
        self.var_token = _CURRENT.set(self)
        obs, record = self.obs, self.record
        if obs.metrics is not None:
            obs.metrics.in_flight.inc()
        if obs.tracing is not None:
            self.span, self.token = obs.tracing.start_response(
                response_id=record.id, model=record.model, conversation_id=self.conversation_id,
                parent_headers=self.parent_headers,
            )
        if obs._logs():
            obs.log.info("response started", extra={
                "event": "response.started", "response_id": record.id, "tenant": record.tenant,
                "model": record.model,
            })
        return self

    def finish(
        self, status: str, *, usage: Mapping[str, Any] | None = None,
        error: Mapping[str, Any] | None = None, iterations: int | None = None,
    ) -> None:
        """The response ended with ``status`` (its Responses ``usage`` and ``error``)."""
        if self.finished:
            return
        self.finished = True
        obs, record = self.obs, self.record
        m = obs.metrics
        if m is not None:
            m.child(m.responses, status).inc()
            if iterations:
                m.iterations.observe(iterations)
        if self.span is not None and obs.tracing is not None:
            obs.tracing.finish_response(self.span, self.token, status=status, usage=usage, error=error)
            self.span = None
        if obs._logs():
            extra = {
                "event": "response.finished", "response_id": record.id, "tenant": record.tenant,
                "model": record.model, "status": status,
                "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
                "iterations": iterations,
                "input_tokens": (usage or {}).get("input_tokens"),
                "output_tokens": (usage or {}).get("output_tokens"),
                "cost_usd": None if self.cost is None else round(self.cost, 10),
                "error_type": (error or {}).get("code"),
            }
            obs.log.info("response finished", extra=extra)
            if status == "failed":
                obs.log.warning("response failed", extra={
                    "event": "error", "response_id": record.id, "tenant": record.tenant,
                    "error_type": (error or {}).get("code"),
                    "error_message": str((error or {}).get("message") or "")[:500],
                })

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        obs = self.obs
        _CURRENT.reset(self.var_token)
        if obs.metrics is not None:
            obs.metrics.in_flight.dec()
        if not self.finished:
            # Left without an outcome (a shutdown hands it over): end the span, count nothing.
            self.finished = True
            if self.span is not None and obs.tracing is not None:
                obs.tracing.finish_response(
                    self.span, self.token, status="interrupted", usage=None, error=None
                )


class StepScope:
    """One step while it runs (its span current), and its final state."""

    __slots__ = ("obs", "step", "span", "token", "done")

    def __init__(self, obs: Observer, step: Step) -> None:
        self.obs = obs
        self.step = step
        self.span = self.token = None
        self.done = False

    def __enter__(self) -> StepScope:
        tracing = self.obs.tracing
        if tracing is not None:
            payload = self.step.request_payload if isinstance(self.step.request_payload, dict) else {}
            self.span, self.token = tracing.start_step(self.step, payload)
        return self

    def finish(self, step: Step) -> None:
        """The step reached its final state (``step`` as stored)."""
        if self.done:
            return
        self.done = True
        obs = self.obs
        m = obs.metrics
        kind = step.kind
        duration = None
        if step.started_at is not None and step.finished_at is not None:
            duration = max(step.finished_at - step.started_at, 0.0)
        payload = step.request_payload if isinstance(step.request_payload, dict) else {}
        inputs, outputs = _tokens(step.usage) if kind == MODEL_CALL else (0, 0)
        cost = step_cost(step.usage) if kind == MODEL_CALL else None
        response = _CURRENT.get()
        if response is not None and kind == MODEL_CALL:
            response.add_cost(step.usage, cost)
        if m is not None:
            m.child(m.steps, kind, step.state).inc()
            tool = "" if kind == MODEL_CALL else m.tool_label(payload.get("name"))
            if duration is not None:
                m.child(m.step_duration, kind, tool).observe(duration)
            if kind == MODEL_CALL and step.usage is not None:
                model = m.models(_model(step))
                if inputs:
                    m.child(m.tokens, model, "input").inc(inputs)
                if outputs:
                    m.child(m.tokens, model, "output").inc(outputs)
                if cost:
                    m.child(m.cost, model).inc(cost)
        if self.span is not None and obs.tracing is not None:
            obs.tracing.finish_step(self.span, self.token, step)
            self.span = None
        if obs._logs():
            error = step.error if isinstance(step.error, dict) else {}
            obs.log.info("step finished", extra={
                "event": "step.finished", "response_id": step.response_id, "step_id": step.id,
                "tenant": None if response is None else response.record.tenant, "kind": kind,
                "step_name": _model(step) if kind == MODEL_CALL else payload.get("name"),
                "state": step.state,
                "duration_ms": None if duration is None else round(duration * 1000, 3),
                "attempt": step.attempt,
                "input_tokens": inputs if kind == MODEL_CALL else None,
                "output_tokens": outputs if kind == MODEL_CALL else None,
                "cost_usd": cost,
                "error_type": error.get("type"),
            })

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.span is not None and self.obs.tracing is not None:
            # Left without a final state (cancelled, store error): close the span as an error.
            span, self.span = self.span, None
            try:
                span.set_attribute("error.type", exc_type.__name__ if exc_type else "unfinished")
            finally:
                span.end()
                from opentelemetry import context

                context.detach(self.token)


class AgentScope:
    """A sub-agent's nested run (an ``invoke_agent`` span under its tool's span)."""

    __slots__ = ("tracing", "name", "model", "conversation_id", "span", "token")

    def __init__(self, tracing: Tracing | None, name: str, model: str, conversation_id: str | None) -> None:
        self.tracing = tracing
        self.name = name
        self.model = model
        self.conversation_id = conversation_id
        self.span = self.token = None

    def __enter__(self) -> AgentScope:
        if self.tracing is not None:
            self.span, self.token = self.tracing.start_agent(self.name, self.model, self.conversation_id)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.span is not None and self.tracing is not None:
            self.tracing.finish_agent(self.span, self.token, exc_type.__name__ if exc_type else None)
