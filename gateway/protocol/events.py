"""The builder of a response's output items and streaming events.

:class:`ResponseBuilder` turns what the response loop reports (model
deltas, finished model calls, hosted tool calls) into the Response's output items and, when
streaming, into the event sequence the OpenAI SDK's ``responses.stream()`` accumulates:

    response.created, response.in_progress,
    per model call: [reasoning] [message] [one item per tool call, in the model's order],
    per hosted tool call: response.mcp_call.in_progress, .completed | .failed, output_item.done,
    response.completed | response.incomplete | response.failed

Item ids derive from the step id (``step_<hex>``): ``rs_<hex>``, ``msg_<hex>``,
``fc_<hex>_<n>``, ``mcp_<hex>_<n>`` (``n`` = the call's position in the model's tool calls), so
replaying a stored chain yields the ids of the live stream. Output items are listed in
``output_index`` order, i.e. the order they opened; for upstreams that stream reasoning, then
text, then tool calls (all known ones) that is the order a non-streamed call gives.

Hosted tool calls (names in ``hosted_tools``) are ``mcp_call`` items: the SDKs show them but never
run them client-side. Calls that wait for the client's approval (names in ``approval_tools``) are ``mcp_approval_request`` items
(``mcpr_<hex>_<n>``), added and done once their arguments are complete. The tools of remote MCP
servers that a response listed are ``mcp_list_tools`` items (:meth:`ResponseBuilder.mcp_listings`),
with ``response.mcp_list_tools.in_progress`` / ``.completed`` (or ``.failed``). ``labels`` maps a
function name the model saw to the ``(server_label, tool name)`` its items show.

Client tool calls are ``function_call`` items, or ``custom_tool_call`` items
(``ctc_<hex>_<n>``, ``input`` the freeform text, events ``response.custom_tool_call_input.delta``
/ ``.done`` once the call is complete) for the upstream names that ``client_tools`` maps to a
custom tool; a call of a namespaced tool carries the tool's own ``name`` and its ``namespace``.

Assistant messages get ``phase``: ``commentary`` when the same model call asked for tools,
else ``final_answer`` (set when the message is done). Reasoning items get ``encrypted_content``
from ``seal_reasoning`` (given when the request includes ``reasoning.encrypted_content``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from gateway.protocol.truncation import tool_output_text
from store.types import COMPLETED

from .response_object import response_object
from .sse import encode_fields, event_head
from .tools import ClientTool, CustomInputDecoder, custom_input
from .usage import add_chat_usage, zero_usage

if TYPE_CHECKING:
    from executors.reassembly import Delta
    from store.types import Step

__all__ = ["ResponseBuilder"]

_DELTA_EVENTS = {
    "output_text": "response.output_text.delta",
    "refusal": "response.refusal.delta",
    "reasoning_text": "response.reasoning_text.delta",
}
_TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.failed",
}


def _hex(step_id: str) -> str:
    return step_id.split("_", 1)[1] if "_" in step_id else step_id


def _text(value: Any) -> str:
    """Message content as text: a string, or the text parts of a list of parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = (part.get("text") for part in value if isinstance(part, dict))
        return "".join(text for text in texts if isinstance(text, str))
    return ""


@dataclass(slots=True)
class _Part:
    """One streamed text part: ``output_text`` / ``refusal`` of a message, or ``reasoning_text``."""

    kind: str
    content_index: int
    part: dict[str, Any]
    pieces: list[str] = field(default_factory=list)
    # A delta event's bytes around its sequence number and its text (built at the first delta).
    frame: tuple[bytes, bytes, bytes] | None = None


@dataclass(slots=True)
class _Item:
    """An output item opened and not yet done."""

    output_index: int
    item: dict[str, Any]
    parts: dict[str, _Part] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _ToolCall:
    """A tool call of one model call, from its first delta to the end of that model call."""

    ordinal: int
    call_id: str | None = None
    name: str | None = None
    opened: _Item | None = None
    pieces: list[str] = field(default_factory=list)  # arguments (buffered until the item opens)
    streamed: int = 0  # how many pieces were sent as delta events
    decoder: CustomInputDecoder | None = None  # a custom tool call's input, decoded as it streams
    input_sent: list[str] = field(default_factory=list)  # that input, as sent in delta events


@dataclass(slots=True)
class _ModelCall:
    hex: str
    reasoning: _Item | None = None
    message: _Item | None = None
    tools: dict[int, _ToolCall] = field(default_factory=dict)  # by the upstream's index
    order: list[_ToolCall] = field(default_factory=list)  # by first appearance


class ResponseBuilder:
    """Builds one response's output items — and, with ``emit``, its stream of SSE events.

    ``base`` holds the :func:`gateway.protocol.response_object.response_object` keyword arguments ``id``,
    ``created_at``, ``model`` and ``request``. ``emit`` receives each encoded event (bytes, one
    event per call) synchronously; None builds no events. ``hosted_tools`` says which tool
    names the gateway runs (their calls become ``mcp_call`` items labelled ``server_label``).

    The loop calls :meth:`start`, then for each top-level step :meth:`model_delta` …
    :meth:`model_call_finished`, :meth:`tool_call_started` … :meth:`tool_call_finished`,
    :meth:`add_usage` for nested model calls, and :meth:`finish` once. Sequence numbers count
    from 0 without gaps across the whole response; an ``output_index`` is never reused.
    """

    def __init__(
        self,
        base: dict[str, Any],
        *,
        hosted_tools: Container[str],
        emit: Callable[[bytes], None] | None = None,
        server_label: str = "stepchain",
        approval_tools: Container[str] = frozenset(),
        labels: Mapping[str, tuple[str, str]] | None = None,
        listings: list[dict[str, Any]] | None = None,
        client_tools: Mapping[str, ClientTool] | None = None,
        seal_reasoning: Callable[[str], str] | None = None,
    ) -> None:
        self._base = base
        self._hosted = hosted_tools
        self._approval = approval_tools
        self._labels = labels or {}
        self._listings = listings
        self._client_tools = client_tools or {}
        self._seal_reasoning = seal_reasoning
        self._emit = emit
        self._server_label = server_label
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._calls: dict[str, _ModelCall] = {}
        self._finished_calls: set[str] = set()
        self._mcp: dict[str, _Item] = {}  # hosted calls awaiting their tool step, by call_id
        self._usage: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None
        self._held: list[bytes] | None = None  # events waiting for finish(), see hold_events
        self._ids: set[str] = set()  # item ids in the output (a re-run after a take-over)
        # (step id, delta kind, item, part) of the last text piece: where the next one goes.
        self._last_text: tuple[str, str, _Item, _Part] | None = None
        self._logged: dict[str, int] = {}  # logged items no replayed step claimed yet, by id

    # -- what the loop reads ----------------------------------------------------------------

    @property
    def output(self) -> list[dict[str, Any]]:
        """The output items so far, in ``output_index`` order (the live list)."""
        return self._output

    @property
    def usage(self) -> dict[str, Any]:
        """Responses usage summed over every model call reported so far."""
        return self._usage if self._usage is not None else zero_usage()

    # -- what the loop reports --------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        """Whether this builder emits events (False: it only builds the output)."""
        return self._emit is not None

    def start(self) -> None:
        """Emit ``response.created`` and ``response.in_progress`` (empty output), then add the
        ``mcp_list_tools`` items of the listings this response made (``listings`` given)."""
        if self._emit is not None:
            # Both events carry the same snapshot: its JSON is made once.
            snapshot = response_object(**self._base, status="in_progress", output=[], usage=None)
            body = orjson.dumps({"response": snapshot})[1:]
            for kind in ("response.created", "response.in_progress"):
                self._put(b"%b%d,%b\n\n" % (event_head(kind), self._sequence, body))
        if self._listings:
            self.mcp_listings(self._listings)

    def mcp_listings(self, listings: list[dict[str, Any]]) -> None:
        """Add one ``mcp_list_tools`` item per listing made by this response (``item_id`` set;
        listings reused from an earlier response have none and add nothing):
        ``{"server_label", "item_id", "tools", "error"?}``."""
        for listing in listings:
            if not listing.get("item_id"):
                continue
            item = self._open(
                {
                    "type": "mcp_list_tools",
                    "id": listing["item_id"],
                    "server_label": listing["server_label"],
                    "tools": [],
                    "error": None,
                }
            )
            common = {"item_id": item.item["id"], "output_index": item.output_index}
            self._send("response.mcp_list_tools.in_progress", **common)
            if listing.get("error"):
                item.item["error"] = listing["error"]
                self._send("response.mcp_list_tools.failed", **common)
            else:
                item.item["tools"] = listing.get("tools") or []
                self._send("response.mcp_list_tools.completed", **common)
            self._send("response.output_item.done", output_index=item.output_index, item=item.item)

    def _label(self, name: str) -> tuple[str, str]:
        """The ``(server_label, tool name)`` a hosted function name shows in its items."""
        return self._labels.get(name) or (self._server_label, name)

    def hold_events(self) -> None:
        """Keep the events from now on back until :meth:`finish`, which sends them just before
        the terminal event. The loop calls it before reporting a last model call that is stored
        together with the response's result: no ``*.done`` event may describe a step the store
        does not have yet, and the client gets both at once after that one write."""
        if self._emit is not None and self._held is None:
            self._held = []

    def adopt_log(self, logged: list[bytes]) -> None:
        """Take the output items of a stream another process began, before replaying its
        chain: ``logged`` is its stored event log (sequence numbers 0…n-1). Every item it
        added keeps its ``output_index`` and id; a replayed item takes the place of the latest
        logged item of its family (its id, or that id re-run after a take-over: ``_1``,
        ``_2``…), and items the log lacks come after. Items no replayed step claims belong to
        model calls a take-over interrupted (one or several times): they stay in the output
        as logged and end ``incomplete`` (:meth:`continue_stream`)."""
        added, done = _logged_items(logged)
        for index in range(max(added) + 1 if added else 0):
            # Items open in order: a gap cannot happen; were it there, the next item fills it.
            item = done.get(index) or added.get(index) or added[min(i for i in added if i > index)]
            self._output.append(item)
            self._ids.add(item.get("id", ""))
        self._logged = {item.get("id", ""): index for index, item in enumerate(self._output)}

    def continue_stream(self, emit: Callable[[bytes], None], logged: list[bytes]) -> None:
        """Go on with a stream another process began (after :meth:`adopt_log` and the replay
        of the response's finished steps, without events): emits what the log lacks about
        those steps (``output_item.added`` / ``.done`` of items whose step finished after its
        last stored event), closes the items of interrupted model calls as ``incomplete``
        (they keep their ``output_index``; a re-run opens new ones, their ids suffixed
        ``_1``, ``_2``…), and numbers new events from n on. Exact after any number of
        take-overs: the log, not the chain, says which items were shown."""
        added, done = _logged_items(logged)
        self._emit = emit
        self._sequence = len(logged)
        still_open = {id(item.item) for item in self._mcp.values()}
        interrupted = set(self._logged.values())  # logged items no replayed step claimed
        self._logged = {}
        for index, item in enumerate(self._output):
            if index not in added:
                self._send("response.output_item.added", output_index=index, item=item)
            if index in done:
                # As the client saw it (a replayed reasoning item is sealed anew, for one).
                self._output[index] = done[index]
                continue
            if id(item) in still_open:
                continue
            if index in interrupted:
                item["status"] = "incomplete"
            self._send("response.output_item.done", output_index=index, item=item)

    def rewind(self, sequence: int) -> None:
        """Undo :meth:`finish` (its events were not stored): the next event gets ``sequence``."""
        self._final = None
        self._held = None
        self._sequence = sequence

    def model_delta(self, step_id: str, delta: Delta) -> None:
        """One streamed piece of the top-level model call ``step_id``; opens items as needed."""
        last = self._last_text
        if last is not None and last[0] == step_id and last[1] == delta.kind and delta.text:
            self._append(last[2], last[3], delta.text)  # the same part as the piece before
            return
        if step_id in self._finished_calls:
            return
        call = self._calls.get(step_id)
        if call is None:
            call = self._calls[step_id] = _ModelCall(_hex(step_id))
        kind = delta.kind
        if kind == "tool_call":
            self._tool_delta(call, delta)
        elif not delta.text:
            return
        elif kind == "reasoning":
            item = call.reasoning or self._open_reasoning(call)
            part = item.parts["reasoning_text"]
            self._last_text = (step_id, kind, item, part)
            self._append(item, part, delta.text)
        elif kind in ("content", "refusal"):
            item = call.message or self._open_message(call)
            part_kind = "output_text" if kind == "content" else "refusal"
            part = item.parts.get(part_kind) or self._open_part(item, part_kind)
            self._last_text = (step_id, kind, item, part)
            self._append(item, part, delta.text)

    def model_call_finished(self, step: Step) -> None:
        """Close the items of a finished model call, opening in full any never streamed.

        ``step.response_payload`` is the reassembled ``chat.completion`` (partial or None if the
        call failed). Items of a failed call, or of one cut by ``length`` / ``content_filter``,
        end ``incomplete``. Hosted calls stay open until their tool step finishes.
        """
        self._finished_calls.add(step.id)
        self._last_text = None
        call = self._calls.pop(step.id, None) or _ModelCall(_hex(step.id))
        payload = step.response_payload if isinstance(step.response_payload, dict) else {}
        choices = payload.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        failed = step.state != COMPLETED
        cut = choice.get("finish_reason") in ("length", "content_filter")
        status = "incomplete" if failed or cut else "completed"

        reasoning = _text(message.get("reasoning_content") or message.get("reasoning"))
        if reasoning and call.reasoning is None:
            self._open_reasoning(call)
        if call.reasoning is not None:
            self._close_parts(call.reasoning, {"reasoning_text": reasoning})
            if self._seal_reasoning is not None:
                text = "".join(part.part["text"] for part in call.reasoning.parts.values())
                call.reasoning.item["encrypted_content"] = self._seal_reasoning(text)
            self._close(call.reasoning, status)

        content = _text(message.get("content"))
        refusal = _text(message.get("refusal"))
        if (content or refusal) and call.message is None:
            self._open_message(call)
        if call.message is not None:
            item = call.message
            for kind, text in (("output_text", content), ("refusal", refusal)):
                if text and kind not in item.parts:
                    self._open_part(item, kind)
            self._close_parts(item, {"output_text": content, "refusal": refusal})
            asked_tools = bool(call.order) or bool(_payload_tool_calls(message))
            item.item["phase"] = "commentary" if asked_tools else "final_answer"
            self._close(item, status)

        self._close_tool_calls(call, _payload_tool_calls(message), failed, status)
        self.add_usage(payload.get("usage") if payload.get("usage") is not None else step.usage)

    def tool_call_started(self, step: Step) -> None:
        """A hosted tool step (``request_payload`` ``{name, call_id, arguments}``) starts."""
        item = self._mcp_item(step)
        self._send(
            "response.mcp_call.in_progress", item_id=item.item["id"], output_index=item.output_index
        )

    def tool_call_finished(self, step: Step) -> None:
        """A hosted tool step ended: ``completed`` (output = ``response_payload``, any JSON value,
        rendered as text) or failed/canceled (``error`` ``{type, message}``)."""
        item = self._mcp_item(step)
        self._mcp.pop(step.request_payload.get("call_id"), None)
        fields = item.item
        if step.state == COMPLETED:
            fields["output"] = tool_output_text(step.response_payload)
            fields["status"] = "completed"
            kind = "response.mcp_call.completed"
        else:
            message = (step.error or {}).get("message") or f"the tool call was {step.state}"
            fields["error"] = {"type": "mcp_tool_execution_error", "content": message}
            fields["status"] = "failed"
            kind = "response.mcp_call.failed"
        self._send(kind, item_id=fields["id"], output_index=item.output_index)
        self._send("response.output_item.done", output_index=item.output_index, item=fields)

    def add_usage(self, chat_usage: dict[str, Any] | None) -> None:
        """Count one model call's Chat Completions usage (None adds nothing)."""
        if chat_usage is not None:
            self._usage = add_chat_usage(self._usage, chat_usage)

    def finish(
        self,
        status: str,
        *,
        error: dict[str, Any] | None = None,
        incomplete_details: dict[str, Any] | None = None,
        completed_at: float | None = None,
    ) -> dict[str, Any]:
        """Close every open item (``incomplete``), emit the terminal event and return the final
        Response object. ``status``: completed | incomplete | failed | cancelled (the last two
        end with ``response.failed``). Calling it again returns the same object, emits nothing.
        """
        if self._final is not None:
            return self._final
        self._last_text = None
        for step_id in list(self._calls):
            call = self._calls.pop(step_id)
            self._finished_calls.add(step_id)
            for item in (call.reasoning, call.message):
                if item is not None:
                    self._close_parts(item, {})
                    self._close(item, "incomplete")
            self._close_tool_calls(call, [], True, "incomplete")
        for item in self._mcp.values():
            self._close(item, "incomplete")
        self._mcp.clear()
        self._final = response_object(
            **self._base,
            status=status,
            output=self._output,
            usage=self.usage,
            error=error,
            incomplete_details=incomplete_details,
            completed_at=time.time() if completed_at is None else completed_at,
        )
        held, self._held = self._held, None
        for event in held or ():
            self._emit(event)  # one by one: a live log's entry i is sequence number i
        self._send(_TERMINAL_EVENTS.get(status, "response.failed"), response=self._final)
        return self._final

    # -- items --------------------------------------------------------------------------------

    def _send(self, kind: str, **fields: Any) -> None:
        if self._emit is not None:
            self._put(encode_fields(kind, self._sequence, fields))

    def _put(self, event: bytes) -> None:
        """Emit (or hold) the encoded event that has the current sequence number."""
        self._sequence += 1
        if self._held is not None:
            self._held.append(event)
        else:
            self._emit(event)  # type: ignore[misc]

    def _open(self, item: dict[str, Any]) -> _Item:
        item_id = item["id"]
        if self._logged:  # replaying a stream another process began (adopt_log)
            claimed = self._claim_logged(item)
            if claimed is not None:
                return claimed
        if item_id in self._ids:  # a model call re-run after a take-over: its items are new
            n = 1
            while f"{item_id}_{n}" in self._ids:
                n += 1
            item["id"] = item_id = f"{item_id}_{n}"
        self._ids.add(item_id)
        opened = _Item(len(self._output), item)
        self._output.append(item)
        self._send("response.output_item.added", output_index=opened.output_index, item=item)
        return opened

    def _claim_logged(self, item: dict[str, Any]) -> _Item | None:
        """The logged slot of a replayed item: its family's latest logged item, unless
        claimed already (the item is then a new one)."""
        base = latest = item["id"]
        if base not in self._ids:
            return None
        n = 1
        while f"{base}_{n}" in self._ids:
            latest = f"{base}_{n}"
            n += 1
        index = self._logged.pop(latest, None)
        if index is None:
            return None
        item["id"] = latest
        self._output[index] = item
        return _Item(index, item)

    def _open_reasoning(self, call: _ModelCall) -> _Item:
        item = {
            "type": "reasoning",
            "id": f"rs_{call.hex}",
            "summary": [],
            "content": [],
            "status": "in_progress",
        }
        call.reasoning = opened = self._open(item)
        self._open_part(opened, "reasoning_text")
        return opened

    def _open_message(self, call: _ModelCall) -> _Item:
        item = {
            "type": "message",
            "id": f"msg_{call.hex}",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        call.message = opened = self._open(item)
        return opened

    def _open_part(self, item: _Item, kind: str) -> _Part:
        if kind == "output_text":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        elif kind == "refusal":
            part = {"type": "refusal", "refusal": ""}
        else:
            part = {"type": "reasoning_text", "text": ""}
        opened = item.parts[kind] = _Part(kind, len(item.parts), part)
        self._send(
            "response.content_part.added",
            item_id=item.item["id"],
            output_index=item.output_index,
            content_index=opened.content_index,
            part=part,
        )
        item.item["content"].append(part)
        return opened

    def _append(self, item: _Item, part: _Part, text: str) -> None:
        part.pieces.append(text)
        if self._emit is None:
            return
        frame = part.frame
        if frame is None:
            # {"type","sequence_number","item_id","output_index","content_index","delta"
            # [,"logprobs":[]]}: everything but the sequence number and the text is fixed.
            middle = b',"item_id":%b,"output_index":%d,"content_index":%d,"delta":' % (
                orjson.dumps(item.item["id"]), item.output_index, part.content_index
            )
            tail = b',"logprobs":[]}\n\n' if part.kind == "output_text" else b"}\n\n"
            frame = part.frame = (event_head(_DELTA_EVENTS[part.kind]), middle, tail)
        head, middle, tail = frame
        self._put(b"%b%d%b%b%b" % (head, self._sequence, middle, orjson.dumps(text), tail))

    def _close_parts(self, item: _Item, final: dict[str, str]) -> None:
        """Finish every part of ``item``: text = ``final[kind]`` if given, else what streamed."""
        for part in item.parts.values():
            streamed = "".join(part.pieces)
            text = final.get(part.kind) or streamed
            if text != streamed and text.startswith(streamed):
                self._append(item, part, text[len(streamed) :])
            key = "refusal" if part.kind == "refusal" else "text"
            part.part[key] = text
            common = {
                "item_id": item.item["id"],
                "output_index": item.output_index,
                "content_index": part.content_index,
            }
            if part.kind == "output_text":
                self._send("response.output_text.done", **common, text=text, logprobs=[])
            elif part.kind == "refusal":
                self._send("response.refusal.done", **common, refusal=text)
            else:
                self._send("response.reasoning_text.done", **common, text=text)
            self._send("response.content_part.done", **common, part=part.part)

    def _close(self, item: _Item, status: str) -> None:
        item.item["status"] = status
        self._send("response.output_item.done", output_index=item.output_index, item=item.item)

    # -- tool calls ---------------------------------------------------------------------------

    def _tool_delta(self, call: _ModelCall, delta: Delta) -> None:
        state = call.tools.get(delta.index)
        if state is None:
            # Numbered by first appearance, not by index: some upstreams start at 1 or skip.
            state = call.tools[delta.index] = _ToolCall(len(call.order))
            call.order.append(state)
        if delta.call_id and state.call_id is None:
            state.call_id = delta.call_id
        if delta.name and state.name is None:
            state.name = delta.name
        if delta.text:
            state.pieces.append(delta.text)
        if state.opened is None:
            # A function_call item needs its call_id when it opens (the SDK keys it by call_id).
            if state.name is None or (state.call_id is None and state.name not in self._hosted):
                return
            if state.name in self._approval:
                return  # an approval request is added whole, when its arguments are complete
            self._open_tool(call, state)
        self._stream_arguments(state)

    def _open_tool(self, call: _ModelCall, state: _ToolCall) -> _Item:
        name = state.name or ""
        client_tool = self._client_tools.get(name)
        if name in self._approval:
            label, tool = self._label(name)
            item = {
                "type": "mcp_approval_request",
                "id": f"mcpr_{call.hex}_{state.ordinal}",
                "server_label": label,
                "name": tool,
                "arguments": "".join(state.pieces),
            }
        elif client_tool is not None and client_tool.kind == "custom":
            item = {
                "type": "custom_tool_call",
                "id": f"ctc_{call.hex}_{state.ordinal}",
                "call_id": state.call_id or f"call_{call.hex}_{state.ordinal}",
                "name": client_tool.name,
                "input": "",
                "status": "in_progress",
            }
            if client_tool.namespace is not None:
                item["namespace"] = client_tool.namespace
        elif name in self._hosted:
            label, tool = self._label(name)
            item = {
                "type": "mcp_call",
                "id": f"mcp_{call.hex}_{state.ordinal}",
                "server_label": label,
                "name": tool,
                "arguments": "",
                "output": None,
                "error": None,
                "status": "in_progress",
                "approval_request_id": None,
            }
        else:
            item = {
                "type": "function_call",
                "id": f"fc_{call.hex}_{state.ordinal}",
                "call_id": state.call_id or f"call_{call.hex}_{state.ordinal}",
                "name": name,
                "arguments": "",
                "status": "in_progress",
            }
            if client_tool is not None:
                item["name"] = client_tool.name
                if client_tool.namespace is not None:
                    item["namespace"] = client_tool.namespace
        state.opened = self._open(item)
        return state.opened

    def _stream_arguments(self, state: _ToolCall) -> None:
        item = state.opened
        assert item is not None
        if item.item["type"] == "mcp_approval_request":
            return  # added whole once the call is complete
        if item.item["type"] == "custom_tool_call":
            self._stream_input(state, item)
            return
        if state.streamed < len(state.pieces):
            piece = "".join(state.pieces[state.streamed :])
            state.streamed = len(state.pieces)
            kind = (
                "response.mcp_call_arguments.delta"
                if item.item["type"] == "mcp_call"
                else "response.function_call_arguments.delta"
            )
            self._send(kind, item_id=item.item["id"], output_index=item.output_index, delta=piece)

    def _stream_input(self, state: _ToolCall, item: _Item) -> None:
        """Send the newly decodable part of a custom tool call's input (its arguments are
        ``{"input": "…"}`` JSON upstream) as ``response.custom_tool_call_input.delta``."""
        if state.decoder is None:
            state.decoder = CustomInputDecoder()
        if state.streamed < len(state.pieces):
            piece = "".join(state.pieces[state.streamed :])
            state.streamed = len(state.pieces)
            text = state.decoder.feed(piece)
            if text:
                state.input_sent.append(text)
                self._send(
                    "response.custom_tool_call_input.delta",
                    item_id=item.item["id"], output_index=item.output_index, delta=text,
                )

    def _close_tool_calls(
        self, call: _ModelCall, tool_calls: list[dict[str, Any]], failed: bool, status: str
    ) -> None:
        """Match the payload's tool calls to the streamed ones (by id, else by position), open
        the missing ones, and close them; hosted calls of a successful model call stay open."""
        by_id = {state.call_id: state for state in call.order if state.call_id}
        unmatched = list(call.order)
        pairs: list[tuple[_ToolCall, dict[str, Any] | None]] = []
        for position, tool_call in enumerate(tool_calls):
            state = by_id.get(tool_call.get("id"))
            if state is None or state not in unmatched:
                state = next((s for s in unmatched if s.ordinal == position), None)
            if state is None:
                state = _ToolCall(len(call.order))
                call.order.append(state)
            else:
                unmatched.remove(state)
            pairs.append((state, tool_call))
        pairs.extend((state, None) for state in unmatched)
        pairs.sort(key=lambda pair: pair[0].ordinal)
        for state, tool_call in pairs:
            streamed = "".join(state.pieces)
            if tool_call is not None:
                function = tool_call.get("function") or {}
                state.call_id = state.call_id or tool_call.get("id")
                state.name = state.name or function.get("name")
                arguments = function.get("arguments")
                if not isinstance(arguments, str):
                    arguments = "" if arguments is None else orjson.dumps(arguments).decode()
                if arguments and arguments != streamed and arguments.startswith(streamed):
                    state.pieces.append(arguments[len(streamed) :])
                elif arguments and arguments != streamed:
                    # Streamed pieces disagree with the payload: the done event carries the payload.
                    state.pieces[:] = [arguments]
                    state.streamed = 1 if state.opened else 0
            elif state.opened is None:
                continue  # a fragment without a name that the model call never completed
            item = state.opened or self._open_tool(call, state)
            self._stream_arguments(state)
            arguments = "".join(state.pieces)
            common = {"item_id": item.item["id"], "output_index": item.output_index}
            if item.item["type"] == "custom_tool_call":
                text = item.item["input"] = custom_input(arguments)
                sent = "".join(state.input_sent)
                if text != sent and text.startswith(sent):
                    self._send("response.custom_tool_call_input.delta", **common, delta=text[len(sent) :])
                self._send("response.custom_tool_call_input.done", **common, input=text)
                self._close(item, status)
                continue
            item.item["arguments"] = arguments
            if item.item["type"] == "mcp_approval_request":
                self._send("response.output_item.done", output_index=item.output_index, item=item.item)
            elif item.item["type"] == "mcp_call":
                self._send("response.mcp_call_arguments.done", **common, arguments=arguments)
                if failed:
                    self._close(item, "incomplete")
                else:
                    self._mcp[state.call_id or item.item["id"]] = item
            else:
                done = {"arguments": arguments, "name": item.item["name"]}
                self._send("response.function_call_arguments.done", **common, **done)
                self._close(item, status)

    def _mcp_item(self, step: Step) -> _Item:
        """The open mcp_call item of a tool step, matched by ``call_id`` (opened from the step's
        request if the model call that asked for it was not reported, e.g. after a resume)."""
        payload = step.request_payload
        call_id = payload.get("call_id")
        item = self._mcp.get(call_id)
        if item is None:
            label, tool = self._label(payload.get("name") or "")
            item = self._open(
                {
                    "type": "mcp_call",
                    "id": f"mcp_{_hex(step.id)}",
                    "server_label": label,
                    "name": tool,
                    "arguments": "",
                    "output": None,
                    "error": None,
                    "status": "in_progress",
                    "approval_request_id": payload.get("approval_request_id"),
                }
            )
            arguments = payload.get("arguments")
            if not isinstance(arguments, str):
                arguments = "" if arguments is None else orjson.dumps(arguments).decode()
            common = {"item_id": item.item["id"], "output_index": item.output_index}
            if arguments:
                self._send("response.mcp_call_arguments.delta", **common, delta=arguments)
            self._send("response.mcp_call_arguments.done", **common, arguments=arguments)
            item.item["arguments"] = arguments
            self._mcp[call_id] = item
        return item


def _logged_items(logged: list[bytes]) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The items a stored event log added and those it closed, by ``output_index``."""
    added: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for event in logged:
        if event.startswith(b"event: response.output_item."):
            data = orjson.loads(event[event.index(b"data: ") + 6 :])
            if data["type"] == "response.output_item.added":
                added[data["output_index"]] = data["item"]
            elif data["type"] == "response.output_item.done":
                done[data["output_index"]] = data["item"]
    return added, done


def _payload_tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``tool_calls`` of a chat.completion message (``[]`` if absent or malformed)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    return [call for call in calls if isinstance(call, dict)]
