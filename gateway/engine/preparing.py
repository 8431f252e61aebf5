"""Preparing a request: everything that can fail with a 4xx, before anything is written.

:class:`PreparingMixin` is the part of :class:`gateway.engine.service.ResponsesService` that
validates a ``POST /v1/responses`` body, loads its history (``previous_response_id`` or
``conversation``), resolves ``item_reference`` items, plans and offers its tools, builds the first
Chat Completions body and the response record (:class:`Prepared`), and makes the event/output
builder (:class:`gateway.protocol.events.ResponseBuilder`) for a response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from executors.upstream import STEP_NOTES
from gateway.errors import GatewayError, InvalidRequestError, PreviousResponseNotFoundError
from gateway.protocol.convert import (
    build_chat_request,
    items_to_messages,
    normalize_input,
    tools_to_chat,
)
from gateway.protocol.events import ResponseBuilder
from gateway.protocol.sealed import seal, unseal
from gateway.protocol.tools import ToolPlan, plan_tools
from gateway.protocol.validation import validate_call_outputs, validate_request
from store.types import ResponseRecord, new_id

from .compaction import compact_threshold_of, expand_compactions
from .conversations import ConversationService, conversation_id_of
from .loop import LoopDeps
from .references import ItemResolver
from .tool_sources import LISTINGS_KEY, ResponseTools, prepare_tool_sources
from .transition import LoopRequest

logger = logging.getLogger("stepchain.service")

__all__ = ["Prepared", "PreparingMixin"]


@dataclass(slots=True)
class Prepared:
    """A validated request, ready to run: its record, loop request and tool facts."""

    record: ResponseRecord
    loop_request: LoopRequest
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    client_tools: frozenset[str]
    plan: ToolPlan
    # The responses whose items ``history`` holds (evicted from the cache when one is deleted).
    history_ids: frozenset[str] = frozenset()
    # The client's own key, sent upstream instead of the gateway's (pass_client_key); never stored.
    upstream_key: str | None = None
    # The MCP tools (and approvals) of this response.
    mcp: ResponseTools | None = None
    # The conversation (Conversations API) the response's input and output are appended to.
    conversation_id: str | None = None
    # Why the response failed, as the error a client sees when nothing was output yet.
    failure: GatewayError | None = None
    # The client request's W3C trace context headers (traceparent, tracestate), for tracing.
    trace_headers: dict[str, str] | None = None


class _NotClient:
    """``name in hosted`` for the event builder: every tool the client does not run."""

    __slots__ = ("client",)

    def __init__(self, client: frozenset[str]) -> None:
        self.client = client

    def __contains__(self, name: object) -> bool:
        return name not in self.client


class PreparingMixin:
    """Prepares requests for :class:`ResponsesService` (which holds the attributes)."""

    deps: LoopDeps
    store: Any
    conversations: ConversationService
    hosted_tool_map: dict[str, str]
    encrypted_content_key: str | None
    reasoning_to_upstream: str
    context_windows: dict[str, int]

    async def prepare(
        self,
        body: dict[str, Any],
        tenant: str | None,
        *,
        upstream_key: str | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> Prepared:
        """Validate ``body`` and build everything the loop needs; writes nothing.

        ``history`` is the conversation up to ``previous_response_id`` when the caller holds it
        already (a WebSocket connection's cache of its ``store: false`` responses); None looks
        the previous response up in the store. Raises InvalidRequestError (400, with ``param``)
        and PreviousResponseNotFoundError.
        """
        validate_request(body)
        prepared = await self._prepare(
            body, tenant, new_id("resp"), time.time(), check=True, history=history
        )
        prepared.upstream_key = upstream_key
        return prepared

    async def _prepare(
        self, body: dict[str, Any], tenant: str | None, response_id: str, created_at: float,
        *, check: bool, history: list[dict[str, Any]] | None = None,
    ) -> Prepared:
        registry = self.deps.registry
        await registry.refresh_if_stale()
        history_ids: frozenset[str] = frozenset()
        previous_id = body.get("previous_response_id")
        conversation_id = conversation_id_of(body.get("conversation"))
        if conversation_id is not None:
            if previous_id:
                raise InvalidRequestError(
                    "Mutually exclusive parameters: provide either 'previous_response_id' or "
                    "'conversation', not both.",
                    param="conversation",
                )
            history = await self.conversations.history(conversation_id, tenant)
        elif history is not None:
            history = list(history)
        elif not previous_id:
            history = []
        else:
            previous = await self.get_visible(previous_id, tenant)
            if previous is None:
                raise PreviousResponseNotFoundError(
                    f"Previous response with id '{previous_id}' not found.",
                    param="previous_response_id",
                )
            if check and previous.status in ("queued", "in_progress"):
                raise InvalidRequestError(
                    f"Previous response '{previous_id}' is still {previous.status}.",
                    param="previous_response_id",
                )
            history_ids, history = await self._conversation(previous)
        input_items = normalize_input(body.get("input", []), response_id)
        if any(item["type"] == "item_reference" for item in input_items):
            input_items = await ItemResolver(self.store, tenant).resolve(input_items, strict=check)
        if check:
            validate_call_outputs(history, input_items)
            if LISTINGS_KEY in body:
                body = {k: v for k, v in body.items() if k != LISTINGS_KEY}
            self._check_encrypted(input_items)
        plan, offered, client_names = self._offer(body)
        body, offered, hosted, approved = await prepare_tool_sources(
            self.deps, body, offered, history, input_items, response_id, check=check
        )
        if plan.left_out and check:
            logger.info(
                "response %s: tools left out (nothing runs them): %s",
                response_id, ", ".join(plan.left_out),
            )
        # Background responses stream upstream too: followers may attach with ?stream=true.
        background = body.get("background") is True
        stream = body.get("stream") is True or background
        messages = items_to_messages(
            expand_compactions(history + input_items, self.encrypted_content_key),
            tool_output_max_bytes=self.deps.tool_output_max_bytes,
            tool_output_max_lines=self.deps.tool_output_max_lines,
            tool_name=plan.upstream_name,
            reasoning_text=None if self.reasoning_to_upstream == "off" else self._reasoning_text,
        )
        if approved:  # the turn that asked for them, answered by the steps that run them
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call["call_id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["arguments"]},
                        }
                        for call in approved
                    ],
                }
            )
        initial_body = build_chat_request(
            body, messages, tools_to_chat(offered), stream=stream, tool_name=plan.upstream_name
        )
        if plan.left_out:
            initial_body[STEP_NOTES] = {"left_out_tools": plan.left_out}
        max_tool_calls = body.get("max_tool_calls")
        window = self.context_windows.get(body["model"], self.context_windows.get("*"))
        loop_request = LoopRequest(
            initial_body=initial_body,
            client_tools=client_names,
            approval_tools=hosted.approval,
            approved_calls=approved,
            max_iterations=self.deps.max_iterations,
            max_tool_calls=max_tool_calls if isinstance(max_tool_calls, int) else None,
            tool_output_max_bytes=self.deps.tool_output_max_bytes,
            tool_output_max_lines=self.deps.tool_output_max_lines,
            context_window=window,
            truncation=body.get("truncation") == "auto",
            compact_threshold=compact_threshold_of(body.get("context_management"), window),
        )
        record = ResponseRecord(
            id=response_id,
            model=body["model"],
            request=body,
            tenant=tenant,
            status="in_progress",
            previous_response_id=previous_id,
            created_at=created_at,
            metadata=body.get("metadata"),
            # A background response is always stored (as at OpenAI): it is read back later.
            store=background or body.get("store", True) is not False,
        )
        return Prepared(
            record, loop_request, input_items, history, client_names, plan, history_ids,
            mcp=hosted,
            conversation_id=conversation_id,
        )

    def _offer(self, body: dict[str, Any]) -> tuple[ToolPlan, list[dict[str, Any]], frozenset[str]]:
        """The request's tools planned for the upstream (custom, namespaced and hosted types
        flattened or left out), then offered by the registry: ``(plan, offered, client names)``.
        A hosted type mapped to a tool that is not registered is left out too."""
        registry = self.deps.registry
        plan = plan_tools(body.get("tools"), self.hosted_tool_map)
        for kind, name in list(plan.mapped.items()):
            if registry.lookup(name) is None:
                logger.warning("hosted_tool_map: %s -> %s, which is not registered", kind, name)
                plan.left_out.append(kind)
        offered, client_tools, _hosted = registry.offer(
            plan.functions, body.get("tool_choice"),
            client_only=plan.client.keys(), server_only=frozenset(plan.mapped.values()),
        )
        return plan, offered, frozenset(t["name"] for t in client_tools)

    def _check_encrypted(self, items: list[dict[str, Any]]) -> None:
        """Every ``encrypted_content`` in the new input must be one of ours (400 otherwise)."""
        for i, item in enumerate(items):
            token = item.get("encrypted_content") if item["type"] == "reasoning" else None
            if token is not None:
                if self.encrypted_content_key is None:
                    raise InvalidRequestError(
                        "Encrypted content is not enabled on this gateway.",
                        param=f"input[{i}].encrypted_content", code="invalid_encrypted_content",
                    )
                unseal(token, self.encrypted_content_key, param=f"input[{i}].encrypted_content")

    def _reasoning_text(self, item: dict[str, Any]) -> str | None:
        """The reasoning text of a reasoning item for the upstream: its sealed text, else (with
        ``reasoning_to_upstream = "all"``) its content or summary parts."""
        token = item.get("encrypted_content")
        if isinstance(token, str) and self.encrypted_content_key is not None:
            try:
                text = unseal(token, self.encrypted_content_key).get("text")
            except InvalidRequestError:
                text = None  # checked when it arrived; a rotated key only loses the reasoning
            if isinstance(text, str):
                return text
        if self.reasoning_to_upstream != "all":
            return None
        parts = item.get("content") or item.get("summary") or ()
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        return "\n".join(t for t in texts if isinstance(t, str)) or None

    def builder(self, prepared: Prepared, emit: Callable[[bytes], None] | None = None) -> ResponseBuilder:
        """The event/output builder for a prepared response (``emit`` None = no events)."""
        return self._builder(prepared.record, prepared.client_tools, prepared.plan, emit)

    def builder_for_record(
        self, record: ResponseRecord, emit: Callable[[bytes], None] | None = None
    ) -> ResponseBuilder:
        """A builder for a stored response (replaying it): client tools from its request."""
        plan, _offered, client_names = self._offer(record.request)
        return self._builder(record, client_names, plan, emit)

    def _builder(
        self,
        record: ResponseRecord,
        client_tools: frozenset[str],
        plan: ToolPlan,
        emit: Callable[[bytes], None] | None,
    ) -> ResponseBuilder:
        base = {
            "id": record.id,
            "created_at": record.created_at,
            "model": record.model,
            "request": record.request,
        }
        seal_reasoning = None
        include = record.request.get("include")
        key = self.encrypted_content_key
        if key is not None and isinstance(include, list) and "reasoning.encrypted_content" in include:

            def seal_reasoning(text: str) -> str:
                return seal({"text": text}, key)

        sources = record.request.get(LISTINGS_KEY) or {}
        return ResponseBuilder(
            base, hosted_tools=_NotClient(client_tools), emit=emit,
            client_tools=plan.client, seal_reasoning=seal_reasoning,
            approval_tools=frozenset(sources.get("approval") or ()),
            labels={fn: (v[0], v[1]) for fn, v in (sources.get("labels") or {}).items()},
            listings=sources.get("listings"),
        )
