"""OpenTelemetry spans for the step chain, per the GenAI semantic conventions (optional extra
``otel``: ``pip install 'stepchain-gateway[otel]'``).

On when ``opentelemetry-sdk`` is installed and either an SDK tracer provider is already set in
the process, or an OTLP endpoint is configured the standard way (``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SERVICE_NAME`` names the service, default
``stepchain``; ``OTEL_SDK_DISABLED=true`` turns it off). Otherwise :func:`get_tracing` returns
None once and the gateway never touches OpenTelemetry again (the import is tried once).

Spans (https://opentelemetry.io/docs/specs/semconv/gen-ai/):

    invoke_agent stepchain         one per response (kind INTERNAL); a sub-agent's run is an
                                   ``invoke_agent {agent name}`` nested under its tool span
    chat {model}                   one per model call (kind CLIENT)
    execute_tool {tool name}       one per tool call (kind INTERNAL)

with ``gen_ai.operation.name``, ``gen_ai.provider.name`` (``openai``: the upstream speaks
OpenAI's Chat Completions), ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.response.id``, ``gen_ai.usage.input_tokens``/``output_tokens``,
``gen_ai.response.finish_reasons``, ``gen_ai.tool.name``, ``gen_ai.tool.call.id``,
``gen_ai.conversation.id`` (the first response of the ``previous_response_id`` chain) and
``error.type`` on failures. Message contents, tool arguments and results are recorded only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.

The W3C ``traceparent`` of the client's request is the parent of the response's span, and the
current span's context is injected into every request to the upstream and to HTTP tools
(:class:`PropagatingTransport`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

__all__ = ["PropagatingTransport", "Tracing", "get_tracing"]

_CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_PROVIDER = "openai"

try:  # tried once: without the extra, tracing is off and costs nothing
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    _AVAILABLE = True
except ImportError:  # pragma: no cover - the extra is in the test environment
    _AVAILABLE = False


class Tracing:
    """Starts the gateway's spans; one per process (see :func:`get_tracing`)."""

    def __init__(self, tracer: Any, *, capture_content: bool) -> None:
        self.tracer = tracer
        self.capture_content = capture_content

    # -- spans ---------------------------------------------------------------------------------

    def start_response(
        self, *, response_id: str, model: str, conversation_id: str | None,
        parent_headers: Mapping[str, str] | None, agent_name: str = "stepchain",
    ) -> tuple[Any, Any]:
        """Start ``invoke_agent`` as the current span; returns (span, token to detach)."""
        parent = _propagate.extract(dict(parent_headers)) if parent_headers else None
        span = self.tracer.start_span(
            f"invoke_agent {agent_name}", context=parent, kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.provider.name": _PROVIDER,
                "gen_ai.agent.name": agent_name,
                "gen_ai.request.model": model,
                "gen_ai.response.id": response_id,
                "gen_ai.conversation.id": conversation_id or response_id,
            },
        )
        return span, _context.attach(_trace.set_span_in_context(span))

    def start_step(self, step: Any, payload: Mapping[str, Any]) -> tuple[Any, Any]:
        """Start ``chat {model}`` or ``execute_tool {name}`` as the current span."""
        if step.kind == "model_call":
            model = str(payload.get("model") or "")
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": _PROVIDER,
                "gen_ai.request.model": model,
                "stepchain.step.id": step.id,
            }
            if self.capture_content:
                attributes["gen_ai.input.messages"] = _json(payload.get("messages"))
            span = self.tracer.start_span(f"chat {model}".rstrip(), kind=SpanKind.CLIENT,
                                          attributes=attributes)
        else:
            name = str(payload.get("name") or "tool")
            attributes = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.type": "function",
                "stepchain.step.id": step.id,
            }
            if payload.get("call_id"):
                attributes["gen_ai.tool.call.id"] = str(payload["call_id"])
            if self.capture_content:
                attributes["gen_ai.tool.call.arguments"] = str(payload.get("arguments") or "")
            span = self.tracer.start_span(f"execute_tool {name}", kind=SpanKind.INTERNAL,
                                          attributes=attributes)
        return span, _context.attach(_trace.set_span_in_context(span))

    def finish_step(self, span: Any, token: Any, step: Any) -> None:
        """Set the outcome attributes of a step's span, end it and restore the context."""
        try:
            if step.kind == "model_call":
                completion = step.response_payload if isinstance(step.response_payload, dict) else {}
                if completion.get("model"):
                    span.set_attribute("gen_ai.response.model", str(completion["model"]))
                if completion.get("id"):
                    span.set_attribute("gen_ai.response.id", str(completion["id"]))
                reasons = [
                    str(c.get("finish_reason")) for c in completion.get("choices") or []
                    if isinstance(c, dict) and c.get("finish_reason")
                ]
                if reasons:
                    span.set_attribute("gen_ai.response.finish_reasons", reasons)
                usage = step.usage if isinstance(step.usage, dict) else {}
                if isinstance(usage.get("prompt_tokens"), int):
                    span.set_attribute("gen_ai.usage.input_tokens", usage["prompt_tokens"])
                if isinstance(usage.get("completion_tokens"), int):
                    span.set_attribute("gen_ai.usage.output_tokens", usage["completion_tokens"])
                if self.capture_content and completion.get("choices"):
                    span.set_attribute(
                        "gen_ai.output.messages",
                        _json([c.get("message") for c in completion["choices"] if isinstance(c, dict)]),
                    )
            elif self.capture_content and step.response_payload is not None:
                span.set_attribute("gen_ai.tool.call.result", _json(step.response_payload))
            if step.state != "completed":
                error = step.error if isinstance(step.error, dict) else {}
                kind = str(error.get("status") or error.get("type") or step.state)
                span.set_attribute("error.type", kind)
                span.set_status(Status(StatusCode.ERROR, str(error.get("message") or step.state)))
        finally:
            span.end()
            _context.detach(token)

    def finish_response(
        self, span: Any, token: Any, *, status: str, usage: Mapping[str, Any] | None,
        error: Mapping[str, Any] | None,
    ) -> None:
        try:
            if usage:
                span.set_attribute("gen_ai.usage.input_tokens", int(usage.get("input_tokens") or 0))
                span.set_attribute("gen_ai.usage.output_tokens", int(usage.get("output_tokens") or 0))
            span.set_attribute("stepchain.response.status", status)
            if status in ("failed", "cancelled", "incomplete"):
                kind = str((error or {}).get("code") or status)
                span.set_attribute("error.type", kind)
                if status == "failed":
                    span.set_status(Status(StatusCode.ERROR, str((error or {}).get("message") or kind)))
        finally:
            span.end()
            _context.detach(token)

    def start_agent(self, name: str, model: str, conversation_id: str | None) -> tuple[Any, Any]:
        """A sub-agent run: ``invoke_agent {name}`` under the current (tool) span."""
        span = self.tracer.start_span(
            f"invoke_agent {name}", kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.provider.name": _PROVIDER,
                "gen_ai.agent.name": name,
                "gen_ai.request.model": model,
                **({"gen_ai.conversation.id": conversation_id} if conversation_id else {}),
            },
        )
        return span, _context.attach(_trace.set_span_in_context(span))

    def finish_agent(self, span: Any, token: Any, error_type: str | None) -> None:
        try:
            if error_type:
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, error_type))
        finally:
            span.end()
            _context.detach(token)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class PropagatingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that adds the current trace context (``traceparent``) to each request."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _propagate.inject(request.headers)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


_TRACING: Tracing | None = None
_DECIDED = False


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def get_tracing() -> Tracing | None:
    """The process's tracing, or None when OpenTelemetry is absent or not configured
    (decided once per process)."""
    global _TRACING, _DECIDED
    if _DECIDED:
        return _TRACING
    _DECIDED = True
    if not _AVAILABLE or _truthy("OTEL_SDK_DISABLED"):
        return None
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # pragma: no cover - the API without the SDK
        return None
    provider = _trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if not endpoint:
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:  # pragma: no cover - the SDK without the exporter
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "stepchain")})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _trace.set_tracer_provider(provider)
    _TRACING = Tracing(
        _trace.get_tracer("stepchain.gateway"), capture_content=_truthy(_CAPTURE_ENV)
    )
    return _TRACING


def reset_tracing_for_tests() -> None:
    """Decide again on the next :func:`get_tracing` (tests that install a provider)."""
    global _TRACING, _DECIDED
    _TRACING, _DECIDED = None, False


def disable_tracing_for_tests() -> None:
    """Tracing off for the rest of the process (after a test that turned it on)."""
    global _TRACING, _DECIDED
    _TRACING, _DECIDED = None, True


__all__ += ["disable_tracing_for_tests", "reset_tracing_for_tests"]
