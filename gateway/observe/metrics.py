"""Prometheus metrics (prometheus-client), served at ``GET /metrics``.

Every name is ``stepchain_…``; counters end in ``_total``, durations are ``_seconds``
histograms. No label takes an unbounded value: routes are templates (``/v1/responses/{response_id}``),
tools are registered tool names (anything else is ``other``), models and upstreams are the ones
configured or seen, capped at :data:`MAX_LABEL_VALUES` each (then ``other``), status classes are
``2xx``/``4xx``/``5xx``/``error``. No ids.

    stepchain_http_request_duration_seconds{route,method,status}      histogram
    stepchain_responses_total{status}                                 final status of each response
    stepchain_responses_in_flight                                     gauge
    stepchain_live_streams                                            gauge: SSE responses being sent
    stepchain_steps_total{kind,state}                                 each step's final state
    stepchain_step_duration_seconds{kind,tool}                        histogram (tool "" for model calls)
    stepchain_upstream_attempts_total{upstream,status_class}          every model-call attempt
    stepchain_upstream_retries_total{upstream}                        attempts after a step's first
    stepchain_upstream_errors_total{upstream,status_class}            failed attempts
    stepchain_tokens_total{model,direction}                           direction: input | output
    stepchain_cost_usd_total{model}                                   known costs only
    stepchain_store_call_duration_seconds{operation}                  histogram
    stepchain_loop_iterations                                         histogram, per response

With several worker processes (``stepchain serve --workers N``) the values live in files under
``PROMETHEUS_MULTIPROC_DIR`` (set by ``serve``) and ``/metrics`` sums every worker's
(prometheus-client's multiprocess mode); gauges are summed over live processes.

The hot path only touches pre-bound label children (a dict lookup and an increment).
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

__all__ = [
    "CONTENT_TYPE_LATEST",
    "MAX_LABEL_VALUES",
    "Metrics",
    "MetricsMiddleware",
    "TimedStore",
    "render_metrics",
]

MAX_LABEL_VALUES = 50
OTHER = "other"
_MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_DURATIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STORE_DURATIONS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


def status_class(status: int | None) -> str:
    """``2xx``/``3xx``/``4xx``/``5xx`` for an HTTP status, ``error`` for none (connection, timeout)."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


class _Capped:
    """Label values as seen, the first ``cap`` distinct ones; later ones become ``other``."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int = MAX_LABEL_VALUES, initial: Iterable[str] = ()) -> None:
        self.cap = cap
        self.seen: set[str] = set()
        for value in initial:
            self(value)

    def __call__(self, value: str | None) -> str:
        value = value or "unknown"
        if value in self.seen:
            return value
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(value)
        return value


class Metrics:
    """The gateway's metrics, one set per process (module-level registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.http_duration = Histogram(
            "stepchain_http_request_duration_seconds",
            "HTTP requests by route template, method and status (SSE: until the stream ends).",
            ["route", "method", "status"], buckets=_DURATIONS, **kw,
        )
        self.responses = Counter(
            "stepchain_responses", "Responses by final status.", ["status"], **kw
        )
        gauge_mode = {"multiprocess_mode": "livesum"} if _MULTIPROC else {}
        self.in_flight = Gauge(
            "stepchain_responses_in_flight", "Responses running in this gateway.", **gauge_mode, **kw
        )
        self.live_streams = Gauge(
            "stepchain_live_streams", "SSE responses being sent to clients.", **gauge_mode, **kw
        )
        self.steps = Counter("stepchain_steps", "Steps by kind and final state.", ["kind", "state"], **kw)
        self.step_duration = Histogram(
            "stepchain_step_duration_seconds",
            "Step duration (started to finished) by kind, and tool name for tool calls.",
            ["kind", "tool"], buckets=_DURATIONS, **kw,
        )
        self.attempts = Counter(
            "stepchain_upstream_attempts", "Model-call attempts by upstream and status class.",
            ["upstream", "status_class"], **kw,
        )
        self.retries = Counter(
            "stepchain_upstream_retries", "Model-call attempts after a step's first.", ["upstream"], **kw
        )
        self.errors = Counter(
            "stepchain_upstream_errors", "Failed model-call attempts by upstream and status class.",
            ["upstream", "status_class"], **kw,
        )
        self.tokens = Counter(
            "stepchain_tokens", "Tokens by model and direction (input | output).",
            ["model", "direction"], **kw,
        )
        self.cost = Counter(
            "stepchain_cost_usd", "Cost in USD of model calls with a configured price.", ["model"], **kw
        )
        self.store_duration = Histogram(
            "stepchain_store_call_duration_seconds", "Store call latency by operation.",
            ["operation"], buckets=_STORE_DURATIONS, **kw,
        )
        self.iterations = Histogram(
            "stepchain_loop_iterations",
            "Loop iterations (transitions that appended steps) per response, top level.",
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50), **kw,
        )
        self.models = _Capped()
        self.upstreams = _Capped()
        # Is this a registered tool's name? (set by the app from its registry)
        self.tool_names: Callable[[str], bool] = lambda name: False
        self._children: dict[tuple[Any, ...], Any] = {}

    # -- pre-bound children ------------------------------------------------------------------

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once and kept (as a :class:`_Lean` child:
        ``inc``/``observe`` without prometheus-client's per-call checks)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = _Lean.of(metric.labels(*labels))
        return found

    def tool_label(self, name: str | None) -> str:
        """A registered tool's name, else ``other`` (the registry bounds the label's values)."""
        return name if name and self.tool_names(name) else OTHER


class _Lean:
    """A labelled counter or histogram child whose ``inc``/``observe`` do what
    prometheus-client's do (same values, same buckets: the first bound ≥ the amount) without
    its per-call observability check, exemplar handling and linear bucket scan: these run
    several times per response. Anything it does not recognise is used as it is."""

    __slots__ = ("child", "_inc", "_sum", "_bounds", "_buckets")

    def __init__(self, child: Any, inc: Any, total: Any, bounds: Any, buckets: Any) -> None:
        self.child = child
        self._inc = inc
        self._sum = total
        self._bounds = bounds
        self._buckets = buckets

    @classmethod
    def of(cls, child: Any) -> Any:
        value = getattr(child, "_value", None)
        if isinstance(child, Counter) and value is not None and hasattr(value, "inc"):
            return cls(child, value.inc, None, None, None)
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        if (
            isinstance(child, Histogram)
            and isinstance(bounds, list)
            and isinstance(buckets, list)
            and total is not None
            and len(bounds) == len(buckets)
            and bounds
            and bounds[-1] == math.inf
        ):
            return cls(child, None, total.inc, tuple(bounds), [b.inc for b in buckets])
        return child

    def inc(self, amount: float = 1) -> None:
        if self._inc is None or amount < 0:
            self.child.inc(amount)  # a histogram has none; a counter raises ValueError
            return
        self._inc(amount)

    def observe(self, amount: float) -> None:
        if self._sum is None or amount != amount:  # not a histogram, or NaN: the library's way
            self.child.observe(amount)
            return
        self._sum(amount)
        self._buckets[bisect_left(self._bounds, amount)](1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.child, name)


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    """The process's metrics (created on first use; prometheus-client registers names once)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def render_metrics() -> bytes:
    """The text exposition of every metric: this process's, or every worker's in multiprocess mode."""
    metrics()
    if _MULTIPROC:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (multiprocess mode)."""
    if _MULTIPROC:
        _multiprocess.mark_process_dead(pid)


class MetricsMiddleware:
    """Pure ASGI: times each HTTP request by route template, method and status, and counts
    the SSE responses being sent (``stepchain_live_streams``)."""

    def __init__(self, app: Any, *, registry: Metrics | None = None) -> None:
        self.app = app
        self.m = registry or metrics()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        streaming = False
        m = self.m

        async def send_wrapper(message: Any) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
                        m.live_streams.inc()
                        break
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if streaming:
                m.live_streams.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            m.child(m.http_duration, template, scope.get("method", ""), str(status)).observe(
                time.perf_counter() - start
            )


class TimedStore:
    """A store whose coroutine methods are timed into ``stepchain_store_call_duration_seconds``
    (everything else passes through). Wraps any :class:`store.base.Store`."""

    def __init__(self, store: Any, registry: Metrics | None = None) -> None:
        self._store = store
        self._m = registry or metrics()
        self._wrapped: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        if wrapped is not None:
            return wrapped
        attr = getattr(self._store, name)
        # wait_events / wait_cancel block until something happens: not a store call's duration.
        if (
            not name.startswith(("_", "wait_"))
            and callable(attr)
            and _is_coroutine_function(attr)
        ):
            histogram = self._m.child(self._m.store_duration, name)

            async def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return await attr(*args, **kwargs)
                finally:
                    histogram.observe(time.perf_counter() - start)

            self._wrapped[name] = timed
            # Found in the instance from now on: no failed lookup (an AttributeError built and
            # dropped) before every call.
            self.__dict__[name] = timed
            return timed
        return attr

    @property
    def inner(self) -> Any:
        """The wrapped store."""
        return self._store


def _is_coroutine_function(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


__all__ += ["mark_process_dead", "metrics", "status_class"]
