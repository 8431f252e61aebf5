"""One response from request to stored result: history, tools, the loop, the final record.

:class:`ResponsesService` is what the HTTP routes call. ``prepare`` does everything that can
fail with a 4xx before anything is written (validation, ``previous_response_id`` history, tool
offering, the first Chat Completions body); ``run`` creates the response record, runs the loop
with a :class:`gateway.protocol.events.ResponseBuilder` observing it, and writes the final output, usage
and status *before* the builder emits the terminal event — so a ``GET`` right after the stream
ends returns the same response.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

import orjson

from executors.upstream import STEP_NOTES
from gateway.errors import (
    ConflictError,
    GatewayError,
    InvalidRequestError,
    PreviousResponseNotFoundError,
    to_gateway_error,
    upstream_error,
)
from gateway.protocol.context_window import is_compaction_request
from gateway.protocol.convert import (
    build_chat_request,
    items_to_messages,
    normalize_input,
    tools_to_chat,
)
from gateway.protocol.events import ResponseBuilder
from gateway.protocol.response_object import response_object
from gateway.protocol.sealed import seal, unseal
from gateway.protocol.tools import ToolPlan, plan_tools
from gateway.protocol.usage import zero_usage
from gateway.protocol.validation import validate_call_outputs, validate_request
from store.types import (
    MODEL_CALL,
    Fence,
    FencedError,
    ResponseRecord,
    Step,
    StepStateError,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
    new_id,
)

from .chat import ENDPOINT as CHAT_ENDPOINT
from .chat import run_chat_completion
from .compaction import compact_threshold_of, expand_compactions
from .conversations import ConversationService, conversation_id_of
from .history import HistoryCache
from .live import LiveStream, LiveStreams
from .loop import LoopDeps, StepBudget, run_response_loop
from .references import ItemResolver
from .tasks import TaskSet
from .tool_sources import LISTINGS_KEY, ResponseTools, prepare_tool_sources
from .transition import AppendSteps, LoopRequest, next_action
from .writer import ResponseWriter

logger = logging.getLogger("stepchain.service")

__all__ = ["Prepared", "ResponsesService", "record_to_object"]

# How many conversations' histories one process keeps (each a list of items).
_HISTORY_CACHE_SIZE = 2048


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


def _conversation_turn(
    prepared: Prepared, status: str, output: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]] | None:
    """``(conversation id, items)`` to append for a finished response: its new input items
    (those the conversation does not hold yet) and its output; None when nothing is appended
    (no conversation, or the response failed or was cancelled)."""
    if prepared.conversation_id is None or status not in ("completed", "incomplete"):
        return None
    held = {item.get("id") for item in prepared.history}
    items = [item for item in prepared.input_items if item.get("id") not in held]
    return prepared.conversation_id, items + output


def record_to_object(record: ResponseRecord) -> dict[str, Any]:
    """The Responses API ``Response`` object for a stored response record."""
    return response_object(
        id=record.id,
        created_at=record.created_at,
        model=record.model,
        request=record.request,
        status=record.status,
        output=record.output,
        usage=record.usage,
        error=record.error,
        incomplete_details=record.incomplete_details,
        completed_at=record.completed_at,
    )


def _response_error(error: dict[str, Any] | None) -> dict[str, Any]:
    """A failed step's ``{"type","message"}`` as the Response's ``{"code","message"}``."""
    error = error or {}
    kind = error.get("type") or "server_error"
    code = {
        "rate_limited": "rate_limit_exceeded",
        "insufficient_quota": "insufficient_quota",
    }.get(kind, "server_error")
    return {"code": code, "message": error.get("message") or kind}


#: How long ``POST …/cancel`` waits for the response to end (its owner may be another replica).
CANCEL_WAIT_S = 10.0


class ResponsesService:
    """Creates, runs and reads responses for the HTTP layer (one instance per process)."""

    def __init__(
        self,
        deps: LoopDeps,
        *,
        owner: str | None = None,
        lease_s: float = 30.0,
        live: LiveStreams | None = None,
        flush_s: float = 0.025,
        hosted_tool_map: dict[str, str] | None = None,
        encrypted_content_key: str | None = None,
        reasoning_to_upstream: str = "encrypted",
        context_windows: dict[str, int] | None = None,
        history_max_bytes: int = 256_000_000,
        tasks: TaskSet | None = None,
    ) -> None:
        self.deps = deps
        # The background tasks responses run in (they outlive their HTTP request).
        self.tasks = tasks if tasks is not None else TaskSet()
        # Hosted tool type (web_search, …) -> the registered tool that implements it.
        self.hosted_tool_map = dict(hosted_tool_map or {})
        # Seals and opens encrypted_content (compaction and reasoning items); None: refused.
        self.encrypted_content_key = encrypted_content_key
        # Which input reasoning goes back upstream as reasoning_content: off | encrypted | all.
        self.reasoning_to_upstream = reasoning_to_upstream
        # Context window in tokens by model name ("*": any other), for truncation and compaction.
        self.context_windows = dict(context_windows or {})
        self.store = deps.store
        self.conversations = ConversationService(deps.store)
        self.owner = owner
        self.lease_s = lease_s
        self.live = live if live is not None else LiveStreams()
        self.flush_s = flush_s
        # The task of each response running in this process, those being cancelled on purpose
        # (not by a shutdown), and the cancel-request watchers of background ones: the one
        # place cancellation is kept (the request itself is a flag in the store).
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancel_requested: set[str] = set()
        self._watchers: dict[str, asyncio.Task[Any]] = {}
        # response id -> (the ids of the responses in its conversation, the conversation's items
        # up to and including that response's output).
        self._history = HistoryCache(max_entries=_HISTORY_CACHE_SIZE, max_bytes=history_max_bytes)
        # Recently deleted responses: a conversation holding one is not cached again.
        self._deleted: OrderedDict[str, None] = OrderedDict()

    # -- reading -------------------------------------------------------------------------------

    async def get_visible(
        self, response_id: str, tenant: str | None, *, any_tenant: bool = False
    ) -> ResponseRecord | None:
        """The stored response if this tenant (or the admin: ``any_tenant``) may read it
        (``store: false`` ones are never)."""
        record = await self.store.get_response(response_id)
        if record is None or not record.store or (record.tenant != tenant and not any_tenant):
            return None
        return record

    async def conversation_items(self, record: ResponseRecord) -> list[dict[str, Any]]:
        """Every item of the conversation ending with ``record``: earlier inputs and outputs,
        oldest first, then this response's input and output (instructions are not items).
        Deleted responses are left out."""
        return (await self._conversation(record))[1]

    async def _conversation(
        self, record: ResponseRecord
    ) -> tuple[frozenset[str], list[dict[str, Any]]]:
        cached = self._history.get(record.id)
        if cached is not None:
            return cached
        ids: frozenset[str] = frozenset()
        items: list[dict[str, Any]] = []
        if record.previous_response_id:
            previous = await self.store.get_response(record.previous_response_id)
            if previous is not None:
                ids, earlier = await self._conversation(previous)
                items = list(earlier)
        inputs = normalize_input(record.request.get("input", []), record.id)
        if any(item["type"] == "item_reference" for item in inputs):
            inputs = await ItemResolver(self.store, record.tenant).resolve(inputs, strict=False)
        items.extend(inputs)
        items.extend(record.output)
        ids = ids | {record.id}
        self._remember(
            record.id, ids, items, previous_id=record.previous_response_id,
            added=inputs + list(record.output),
        )
        return ids, items

    async def history_for(self, previous_id: str | None, tenant: str | None) -> list[dict[str, Any]]:
        """The conversation items up to ``previous_id`` (none for None); 400
        ``previous_response_not_found`` if this tenant cannot read that response."""
        if not previous_id:
            return []
        previous = await self.get_visible(previous_id, tenant)
        if previous is None:
            raise PreviousResponseNotFoundError(
                f"Previous response with id '{previous_id}' not found.",
                param="previous_response_id",
            )
        return list(await self.conversation_items(previous))

    async def input_items(self, record: ResponseRecord) -> list[dict[str, Any]]:
        """The input items of a stored response as ``input_items`` lists them: normalized, with
        ``item_reference`` items resolved to the items they named (if still there)."""
        items = normalize_input(record.request.get("input", []), record.id)
        if any(item["type"] == "item_reference" for item in items):
            items = await ItemResolver(self.store, record.tenant).resolve(items, strict=False)
        return items

    def _remember(
        self,
        response_id: str,
        ids: frozenset[str],
        items: list[dict[str, Any]],
        *,
        previous_id: str | None = None,
        added: list[dict[str, Any]] | None = None,
    ) -> None:
        if not ids.isdisjoint(self._deleted):
            return  # an earlier response was deleted while this one ran: rebuild it when asked
        self._history.put(response_id, ids, items, previous_id=previous_id, added=added)

    def _forget(self, response_id: str) -> None:
        """Drop every cached conversation that holds ``response_id``'s items."""
        self._deleted[response_id] = None
        if len(self._deleted) > _HISTORY_CACHE_SIZE:
            self._deleted.popitem(last=False)
        self._history.forget_containing(response_id)

    async def steps(
        self, record: ResponseRecord, scope_parent: str | None | EllipsisType = ...
    ) -> list[Step]:
        """The recorded step chain: every step of every scope by ``sequence`` (the default),
        or one scope's (``scope_parent`` None: the top level; a step id: that sub-agent's)."""
        if scope_parent is ...:
            return await self.store.list_steps(record.id)
        return await self.store.list_chain(record.id, scope_parent)

    async def chat_completion(
        self,
        body: dict[str, Any],
        tenant: str | None,
        *,
        upstream_key: str | None = None,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """A Chat Completions call passed through and recorded (:mod:`gateway.engine.chat`);
        ``upstream_key`` replaces the gateway's upstream key (pass_client_key)."""
        upstream = self.deps.upstream
        if upstream_key:
            upstream = upstream.with_api_key(upstream_key)
        return await run_chat_completion(
            self.store, upstream, body, tenant=tenant, owner=self.owner, lease_s=self.lease_s,
            on_chunk=on_chunk, observer=self.deps.observer,
        )

    async def delete(self, record: ResponseRecord) -> None:
        """Delete a stored response; later responses that continue a conversation through it
        no longer see its items (its children keep theirs). Raises StoreError."""
        await self.store.delete_response(record.id)
        self._forget(record.id)

    # -- running tasks -------------------------------------------------------------------------

    def spawn(
        self, response_id: str, coro: Coroutine[Any, Any, Any], *, background: bool = False
    ) -> asyncio.Task[Any]:
        """Run ``coro`` (the work of response ``response_id``) as a background task of its own,
        findable by :meth:`running` and :meth:`cancel` until it ends. A ``background``
        response also watches the store for a cancel request from any replica."""
        task = self.tasks.spawn(coro)
        self._running[response_id] = task
        if background:
            old = self._watchers.pop(response_id, None)
            if old is not None:
                old.cancel()
            self._watchers[response_id] = asyncio.ensure_future(self._watch_cancel(response_id))
        task.add_done_callback(lambda _t: self._forget_task(response_id, task))
        return task

    def _forget_task(self, response_id: str, task: asyncio.Task[Any]) -> None:
        if self._running.get(response_id) is task:
            del self._running[response_id]
            self._cancel_requested.discard(response_id)
            watcher = self._watchers.pop(response_id, None)
            if watcher is not None:
                watcher.cancel()

    def running(self, response_id: str) -> asyncio.Task[Any] | None:
        """The task of a response running in this process, None when it is not."""
        task = self._running.get(response_id)
        return task if task is not None and not task.done() else None

    def cancel(self, response_id: str) -> asyncio.Task[Any] | None:
        """Cancel a response running here on purpose: it ends ``cancelled``, its open steps
        ``canceled`` (unlike a shutdown, which leaves it for another process to resume).
        Returns its task (to await), None when it is not running here."""
        task = self.running(response_id)
        if task is not None and response_id not in self._cancel_requested:
            self._cancel_requested.add(response_id)  # once: a second cancel would cut it short
            task.cancel()
        return task

    async def cancel_background(self, record: ResponseRecord) -> ResponseRecord:
        """``POST /v1/responses/{id}/cancel``: stop a background response, on whichever
        replica runs it (a flag in the store that its owner observes), and return its record
        once it has ended (after ``CANCEL_WAIT_S`` at most: as stored then). A finished one is
        returned as it is. Raises InvalidRequestError for a response that is not background."""
        if not record.request.get("background"):
            raise InvalidRequestError(
                "Only background responses can be cancelled.", param="response_id"
            )
        if record.status in ("queued", "in_progress"):
            await self.store.request_cancel(record.id)
            task = self.cancel(record.id)
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT_S)
            else:
                await self._until_finished(record.id, CANCEL_WAIT_S)
        return await self.store.get_response(record.id) or record

    async def _until_finished(self, response_id: str, timeout_s: float) -> None:
        """Wait (``Store.wait_events``) until the response is no longer in progress."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        after = -1
        while loop.time() < deadline:
            record = await self.store.get_response(response_id)
            if record is None or record.status not in ("queued", "in_progress"):
                return
            events = await self.store.list_events(response_id, after=after)
            if events:
                after = events[-1][0]
            await self.store.wait_events(response_id, after, min(1.0, deadline - loop.time()))

    async def _watch_cancel(self, response_id: str) -> None:
        """Cancel the response when a cancel request reaches the store (another replica's)."""
        if await self.store.wait_cancel(response_id):
            self.cancel(response_id)

    async def _cancel_unfinished(self, store: Any, response_id: str) -> None:
        for step in await store.list_steps(response_id):
            if not step.finished:
                try:
                    await store.cancel_step(step.id)
                except StepStateError:
                    pass  # it finished meanwhile

    def start(
        self,
        prepared: Prepared,
        *,
        streamed: bool,
        listener: Callable[[bytes], None] | None = None,
        generate: bool = True,
    ) -> tuple[asyncio.Task[Any], LiveStream | None]:
        """Run a prepared response in a task of its own (it finishes and is stored even if the
        client leaves); ``streamed`` responses get an event log (cached here, durable in the
        store), whose events are also passed to ``listener`` as they are published. Without
        ``generate`` the response is only recorded (:meth:`record_only`). Returns the task and
        the log."""
        log = self.live.open(prepared.record.id) if streamed else None
        if log is not None and listener is not None:
            log.listeners.append(listener)
        builder = self.builder(prepared, emit=None if log is None else log.emit)
        coro = self.run(prepared, builder, log) if generate else self.record_only(prepared, builder, log)
        background = prepared.record.request.get("background") is True
        return self.spawn(prepared.record.id, coro, background=background), log

    def resume_in_task(self, record: ResponseRecord) -> asyncio.Task[Any]:
        """Resume a claimed response in a task of its own (see :meth:`resume`)."""
        background = record.request.get("background") is True
        return self.spawn(record.id, self.resume(record), background=background)

    # -- creating ------------------------------------------------------------------------------

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

    async def replay_chain(self, response_id: str, builder: ResponseBuilder) -> None:
        """Feed the finished steps of a response to ``builder`` as the loop reported them:
        top-level steps in order (same item ids as the live stream), sub-agents' usage."""
        for step in await self.store.list_steps(response_id):
            if not step.finished:
                continue
            if step.scope_parent is not None or is_compaction_request(step.request_payload):
                if step.kind == MODEL_CALL:
                    builder.add_usage(step.usage)
            elif step.kind == MODEL_CALL:
                builder.model_call_finished(step)
            else:
                builder.tool_call_started(step)
                builder.tool_call_finished(step)

    async def run(
        self, prepared: Prepared, builder: ResponseBuilder, log: LiveStream | None = None
    ) -> dict[str, Any]:
        """Create the record, run the loop to its end, store the result, then emit the terminal
        event. Returns the final Response object. Raises StoreError only if the record itself
        cannot be created (nothing has run then)."""
        # The response, its first model call and its first events in one transaction.
        first = next_action(prepared.loop_request, [])
        assert isinstance(first, AppendSteps)
        fence = Fence(self.owner, 1) if self.owner is not None else None
        writer = ResponseWriter(self.store, prepared.record.id, fence, log, flush_s=self.flush_s)
        if log is not None:
            log.hold()
        builder.start()
        try:
            started = await writer.create_response(
                prepared.record, owner=self.owner, lease_s=self.lease_s, first_steps=first.steps
            )
        except BaseException:
            await writer.close()
            if log is not None:
                log.drop_staged()
                self.live.close(prepared.record.id, stream=log)
            raise
        return await self._drive(prepared, builder, writer, started)

    async def record_only(
        self, prepared: Prepared, builder: ResponseBuilder, log: LiveStream | None = None
    ) -> dict[str, Any]:
        """Store the response as ``completed`` with no output and no model call (WebSocket
        mode's ``generate: false``: request state for a later ``previous_response_id``), with
        its events (``log``) in the same write, and return the Response object."""
        completed_at = time.time()
        record = dataclasses.replace(
            prepared.record, status="completed", output=[], usage=zero_usage(),
            completed_at=completed_at,
        )
        if log is not None:
            log.hold()
        builder.start()
        final = builder.finish("completed", completed_at=completed_at)
        pending = log.pending() if log is not None else None
        try:
            await self.store.create_response(record, events=pending)
        except BaseException:
            if log is not None:
                log.drop_staged()
            raise
        finally:
            if log is not None:
                if pending is not None and log.staged:
                    log.committed(pending[0], len(pending[1]))
                self.live.close(record.id, stream=log)
        if record.store:
            self._remember(
                record.id, prepared.history_ids | {record.id},
                prepared.history + prepared.input_items,
                previous_id=record.previous_response_id, added=prepared.input_items,
            )
        return final

    async def resume(self, record: ResponseRecord) -> dict[str, Any]:
        """Finish a response another process left unfinished, from its chain in the store.

        Finished top-level steps are replayed into a fresh builder (same item ids as the live
        stream had), then the loop settles the interrupted steps and goes on.
        """
        logger.info("resuming response %s", record.id)
        writer = ResponseWriter(self.store, record.id, record.fence, flush_s=self.flush_s)
        if (record.metadata or {}).get("endpoint") == CHAT_ENDPOINT:
            # A passthrough call's client is gone with its process: nothing to resume it for.
            await self._cancel_unfinished(writer, record.id)
            error = {"code": "server_error", "message": "interrupted: the gateway process stopped"}
            await writer.update_response(
                record.id, status="failed", error=error, completed_at=time.time()
            )
            return record_to_object(record)
        try:
            prepared = await self._prepare(
                record.request, record.tenant, record.id, record.created_at, check=False
            )
        except StoreError:
            raise  # the store, not the request: the lease lapses and a later claim tries again
        except Exception as exc:  # the request cannot be rebuilt: end it, do not retry forever
            error = {"code": "server_error", "message": f"cannot resume: {exc}"}
            await writer.update_response(
                record.id, status="failed", error=error, completed_at=time.time()
            )
            return record_to_object(record)
        prepared.record = record
        builder = self.builder(prepared)
        logged = await writer.list_events(record.id)
        if logged:  # the items it showed keep their places, however many take-overs ago
            builder.adopt_log([event for _seq, event in logged])
        builder.start()  # no events: adds the listings' items to the output
        await self.replay_chain(record.id, builder)
        if logged:
            # It was streamed: go on with its durable log (sequence numbers continue).
            log = self.live.open(record.id)
            log.base = log.persisted = logged[-1][0] + 1
            writer = ResponseWriter(self.store, record.id, record.fence, log, flush_s=self.flush_s)
            builder.continue_stream(log.emit, [event for _seq, event in logged])
        if record.cancel_requested:
            return await self._end_cancelled(prepared, builder, writer)
        return await self._drive(prepared, builder, writer)

    async def _end_cancelled(
        self, prepared: Prepared, builder: ResponseBuilder, writer: ResponseWriter
    ) -> dict[str, Any]:
        """End a resumed response whose cancel was requested while nobody ran it."""
        return await self._drive(prepared, builder, writer, cancelled=True)

    async def _conversation_root(self, record: ResponseRecord) -> str:
        """The first response of ``record``'s ``previous_response_id`` chain (at most 100 back)."""
        root = record
        for _ in range(100):
            if not root.previous_response_id:
                break
            previous = await self.store.get_response(root.previous_response_id)
            if previous is None:
                return root.previous_response_id
            root = previous
        return root.id

    async def _drive(
        self,
        prepared: Prepared,
        builder: ResponseBuilder,
        writer: ResponseWriter,
        started: list[Step] | None = None,
        *,
        cancelled: bool = False,
    ) -> dict[str, Any]:
        try:
            return await self._observed(prepared, builder, writer, started, cancelled)
        except FencedError:
            # Another process owns the response now: stop without writing anything more.
            logger.warning("response %s was taken over by another process; stopped", prepared.record.id)
            if writer.log is not None:
                writer.log.drop_staged()
                self.live.close(prepared.record.id, stream=writer.log, handed_over=True)
            return record_to_object(prepared.record)
        finally:
            await writer.close()
            if writer.log is not None:
                self.live.close(prepared.record.id, stream=writer.log)

    async def _observed(
        self,
        prepared: Prepared,
        builder: ResponseBuilder,
        writer: ResponseWriter,
        started: list[Step] | None,
        cancelled: bool,
    ) -> dict[str, Any]:
        watch = self.deps.observer
        if watch is None:
            return await self._drive_loop(prepared, builder, writer, started, cancelled, None)
        record = prepared.record
        conversation = None
        if watch.tracing is not None:
            conversation = await self._conversation_root(record)
        with watch.response(
            record, conversation_id=conversation, parent_headers=prepared.trace_headers
        ) as scope:
            return await self._drive_loop(prepared, builder, writer, started, cancelled, scope)

    async def _drive_loop(
        self,
        prepared: Prepared,
        builder: ResponseBuilder,
        writer: ResponseWriter,
        started: list[Step] | None,
        cancelled: bool,
        scope: Any,
    ) -> dict[str, Any]:
        record = prepared.record
        iterations = 0
        deps = dataclasses.replace(self.deps, store=writer)
        if prepared.upstream_key:
            deps = dataclasses.replace(deps, upstream=deps.upstream.with_api_key(prepared.upstream_key))
        if prepared.mcp is not None and prepared.mcp.routes:
            deps = dataclasses.replace(deps, mcp_routes=prepared.mcp.routes)
        used = len(started) if started is not None else len(await self.store.list_steps(record.id))
        deps = dataclasses.replace(deps, step_budget=StepBudget(deps.max_steps, used))
        error = incomplete = None
        last: Step | None = None  # the final model call, when the loop left storing it to us
        try:
            if cancelled:
                raise asyncio.CancelledError
            outcome = await run_response_loop(
                deps, record.id, prepared.loop_request, observer=builder, started=started,
                # The last step and the result share a write (its events wait for it).
                defer_final_write=True,
            )
        except asyncio.CancelledError:
            if not cancelled and record.id not in self._cancel_requested:
                raise  # shutting down: leave it in progress for another process to resume
            status, error = "cancelled", None
            await self._cancel_unfinished(writer, record.id)
        except FencedError:
            raise
        except StoreError as exc:
            logger.error("store error in response %s", record.id, exc_info=exc)
            status, error = "failed", {"code": "server_error", "message": f"store error: {exc}"}
            prepared.failure = to_gateway_error(exc)
        except Exception as exc:  # a bug must still end the response, never leave it in_progress
            logger.exception("response %s failed unexpectedly", record.id)
            status, error = "failed", {"code": "server_error", "message": "internal error"}
            prepared.failure = to_gateway_error(exc)
        else:
            last = outcome.unwritten
            iterations = outcome.iterations
            status = outcome.status
            if status == "failed":
                error = _response_error(outcome.error)
                failed = outcome.error or {}
                prepared.failure = upstream_error(
                    error["message"], kind=failed.get("type"), status=failed.get("status"),
                    param=failed.get("param"), code=failed.get("code"),
                )
            elif status == "incomplete":
                incomplete = {"reason": outcome.incomplete_reason}
        completed_at = time.time()
        output = builder.output
        if record.store:
            self._remember(
                record.id,
                prepared.history_ids | {record.id},
                prepared.history + prepared.input_items + output,
                previous_id=record.previous_response_id,
                added=prepared.input_items + output,
            )
        result = {
            "status": status,
            "output": output,
            "usage": builder.usage,
            "error": error,
            "incomplete_details": incomplete,
            "completed_at": completed_at,
        }
        turn = _conversation_turn(prepared, status, output)
        # The terminal event (and any held back) is stored with the result, in one write, and
        # reaches followers only once that write is done.
        log = writer.log
        resume_at = log.end if log is not None else 0
        if log is not None:
            log.hold()
        final = builder.finish(
            status, error=error, incomplete_details=incomplete, completed_at=completed_at
        )
        try:
            try:
                await self._write_result(writer, record.id, last, result, turn)
            except (StoreNotFoundError, StoreConflictError) as exc:
                if turn is None:
                    raise
                # The conversation was deleted meanwhile (or already holds an item id sent
                # again concurrently): the response's result is kept all the same.
                logger.warning("conversation %s: turn of response %s not added: %s",
                               turn[0], record.id, exc)
                await self._write_result(writer, record.id, last, result, None)
        except FencedError:
            raise
        except StoreError as exc:
            logger.error("could not store the result of response %s", record.id, exc_info=exc)
            status, error = "failed", {"code": "server_error", "message": f"store error: {exc}"}
            prepared.failure = to_gateway_error(exc)
            if log is not None:
                log.drop_staged()
            builder.rewind(resume_at)
            final = builder.finish("failed", error=error, completed_at=completed_at)
        if scope is not None:
            scope.finish(status, usage=builder.usage, error=error, iterations=iterations)
        return final

    async def _write_result(
        self,
        store: Any,
        response_id: str,
        last: Step | None,
        result: dict[str, Any],
        turn: tuple[str, list[dict[str, Any]]] | None,
    ) -> None:
        """The response's result (with its unwritten last model call, and its conversation
        turn) in one store transaction (``store``: the response's writer)."""
        extra = {} if turn is None else {"conversation_items": turn}
        if last is not None:
            await store.complete_step(
                last.id, last.response_payload, last.usage, upstream=last.upstream,
                response_update=result, **extra,
            )
        else:
            await store.update_response(response_id, **result, **extra)
