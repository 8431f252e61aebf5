"""Reassemble a streamed Chat Completion (``chat.completion.chunk`` dicts) into one ``chat.completion``.

:class:`Reassembler` is I/O-free: feed it each parsed chunk, get back the normalised
:class:`Delta` pieces to forward, and at the end ask for the complete completion::

    r = Reassembler()
    for chunk in chunks:
        for delta in r.feed(chunk): ...
    for delta in r.flush(): ...           # tool calls that were still held back
    completion = r.finish(saw_done=True)  # or raises StreamCutError

The completion has the non-streaming shape::

    {"id", "object": "chat.completion", "created", "model",
     "choices": [{"index": 0, "finish_reason",
                  "message": {"role": "assistant", "content": str | None, "refusal": str | None,
                              "reasoning_content": str,   # only if the stream had any
                              "tool_calls": [...]}}],     # only if any, ordered by index
     "usage": dict | None, "system_fingerprint"?}

Upstream quirks it takes (shared/reference/responses-api.md): chunks with ``choices: []`` (Azure's
first chunk, the final usage chunk); tool-call pieces keyed by ``index`` with ``id``/``name`` only in
the first piece, or a whole call in one piece; empty ``arguments`` pieces; ``reasoning_content`` (or
``reasoning``) deltas; ``content: null``. Only choice 0 is kept; other choices are ignored.

Tool calls: the first :class:`Delta` of each call carries both ``call_id`` and ``name``. If an
upstream sends one before the other, the call's argument pieces are held back until both are known.
A call that still has no id when a later call starts, when ``finish_reason`` arrives, or at
:meth:`Reassembler.flush`, gets a synthesised id ``call_<24 hex>`` (and ``""`` for a missing name),
so the loop can always match its ``tool`` message to it.

A stream is *finished* once choice 0 had a ``finish_reason`` or ``[DONE]`` was seen; anything else is
a cut-off stream and :meth:`Reassembler.finish` raises :class:`StreamCutError` instead of returning a
silently shortened answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

import orjson

__all__ = ["Delta", "Reassembler", "StreamCutError", "new_call_id"]


class Delta(NamedTuple):
    """One normalised piece of a streamed answer (immutable; a named tuple: one is made per
    streamed piece, and a tuple costs a fraction of a frozen dataclass).

    ``kind`` is ``"content"``, ``"refusal"``, ``"reasoning"`` or ``"tool_call"``. ``text`` is the
    text piece, or for a tool call the piece of its JSON ``arguments``. ``index`` is the tool call's
    index; ``call_id`` and ``name`` are set on the first Delta of each tool call only.
    """

    kind: str
    text: str = ""
    index: int = 0
    call_id: str | None = None
    name: str | None = None


class StreamCutError(Exception):
    """The stream ended before choice 0 had a ``finish_reason`` and without ``data: [DONE]``."""


def new_call_id() -> str:
    """A synthesised tool-call id, ``call_`` + 24 hex digits, for upstreams that send none."""
    return "call_" + uuid.uuid4().hex[:24]


class _ToolCall:
    """One tool call being assembled; ``held`` keeps argument pieces until id and name are known."""

    __slots__ = ("id", "name", "arguments", "held", "announced")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []
        self.held: list[str] = []
        self.announced = False


class Reassembler:
    """Builds one ``chat.completion`` from its chunks; see the module docstring for the rules."""

    __slots__ = (
        "_id",
        "_created",
        "_model",
        "_fingerprint",
        "_usage",
        "_content",
        "_refusal",
        "_reasoning",
        "_calls",
        "_last_index",
        "_finish_reason",
        "_known",
    )

    def __init__(self) -> None:
        self._id: str | None = None
        self._created: int | None = None
        self._model: str | None = None
        self._fingerprint: str | None = None
        self._usage: dict[str, Any] | None = None
        # None until the stream carried a string for it, so `null` and `""` stay distinct.
        self._content: list[str] | None = None
        self._refusal: list[str] | None = None
        self._reasoning: list[str] | None = None
        self._calls: dict[int, _ToolCall] = {}
        self._last_index: int | None = None
        self._finish_reason: str | None = None
        self._known = False  # id, model, created and system_fingerprint all seen

    @property
    def finish_reason(self) -> str | None:
        """Choice 0's ``finish_reason`` once it has been seen, else None."""
        return self._finish_reason

    def feed(self, chunk: dict[str, Any]) -> list[Delta]:
        """Take one parsed ``chat.completion.chunk``; return the Deltas it adds, in order."""
        if not self._known:
            self._take_meta(chunk)
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage
        out: list[Delta] = []
        choices = chunk.get("choices")
        if not choices:
            return out
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                text = delta.get("content")
                if text is not None:
                    if self._content is None:
                        self._content = []
                    if text:
                        self._content.append(text)
                        out.append(Delta("content", text))
                    if len(delta) > 1:  # most chunks carry content alone
                        self._others(delta, out)
                else:
                    self._others(delta, out)
            finish_reason = choice.get("finish_reason")
            if finish_reason is not None:
                self._finish_reason = finish_reason
                self._settle_all(out)
        return out

    def _take_meta(self, chunk: dict[str, Any]) -> None:
        # Not simply the first chunk's: Azure's first chunk has id "", model "" and created 0.
        if not self._id:
            self._id = chunk.get("id")
        if not self._model:
            self._model = chunk.get("model")
        if not self._created:
            self._created = chunk.get("created")
        if self._fingerprint is None:
            self._fingerprint = chunk.get("system_fingerprint")
        known = bool(self._id and self._model and self._created)
        self._known = known and self._fingerprint is not None

    def _others(self, delta: dict[str, Any], out: list[Delta]) -> None:
        """The reasoning, refusal and tool-call pieces of a chunk's ``delta``."""
        text = delta.get("reasoning_content")
        if text is None:
            text = delta.get("reasoning")
            if type(text) is not str:
                text = None  # e.g. an object of reasoning details: not text
        if text:
            if self._reasoning is None:
                self._reasoning = []
            self._reasoning.append(text)
            out.append(Delta("reasoning", text))
        text = delta.get("refusal")
        if text is not None:
            if self._refusal is None:
                self._refusal = []
            if text:
                self._refusal.append(text)
                out.append(Delta("refusal", text))
        pieces = delta.get("tool_calls")
        if pieces:
            for piece in pieces:
                self._tool_piece(piece, out)

    def _tool_piece(self, piece: dict[str, Any], out: list[Delta]) -> None:
        index = piece.get("index")
        call_id = piece.get("id")
        if index is None:
            # Some servers omit the index: a new id starts a new call, otherwise continue the last.
            known = call_id is not None and any(c.id == call_id for c in self._calls.values())
            if self._last_index is None or (call_id and not known):
                index = len(self._calls)
            else:
                index = self._last_index
        call = self._calls.get(index)
        if call is None:
            if self._last_index is not None and self._last_index != index:
                previous = self._calls.get(self._last_index)
                if previous is not None and not previous.announced:
                    self._settle(self._last_index, previous, out)
            call = self._calls[index] = _ToolCall()
        self._last_index = index
        if call_id and call.id is None:
            call.id = call_id
        function = piece.get("function")
        arguments = None
        if function:
            name = function.get("name")
            if name and call.name is None:
                call.name = name
            arguments = function.get("arguments")
            if arguments is not None and type(arguments) is not str:
                # A few servers send the arguments as an object rather than a JSON string.
                arguments = orjson.dumps(arguments).decode()
        if call.announced:
            if arguments:
                call.arguments.append(arguments)
                out.append(Delta("tool_call", arguments, index))
            return
        if arguments:
            call.held.append(arguments)
        if call.id is not None and call.name is not None:
            self._announce(index, call, out)

    def _announce(self, index: int, call: _ToolCall, out: list[Delta]) -> None:
        text = "".join(call.held) if call.held else ""
        call.held = []
        if text:
            call.arguments.append(text)
        call.announced = True
        out.append(Delta("tool_call", text, index, call.id, call.name))

    def _settle(self, index: int, call: _ToolCall, out: list[Delta]) -> None:
        if call.id is None:
            call.id = new_call_id()
        if call.name is None:
            call.name = ""
        self._announce(index, call, out)

    def _settle_all(self, out: list[Delta]) -> None:
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.announced:
                self._settle(index, call, out)

    def flush(self) -> list[Delta]:
        """Deltas still held back (tool calls waiting for an id or name); call when the stream ends."""
        out: list[Delta] = []
        self._settle_all(out)
        return out

    def finish(self, saw_done: bool) -> dict[str, Any]:
        """The complete ``chat.completion``; raises StreamCutError if the stream never finished."""
        if self._finish_reason is None and not saw_done:
            raise StreamCutError(
                "the upstream stream ended before a finish_reason and without [DONE]"
            )
        self._settle_all([])
        return self.partial()

    def partial(self) -> dict[str, Any]:
        """What has been assembled so far, in the completion shape (for keeping partial text)."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if self._content is None else "".join(self._content),
            "refusal": None if self._refusal is None else "".join(self._refusal),
        }
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._calls:
            calls = self._calls
            message["tool_calls"] = [
                {
                    "id": calls[i].id,
                    "type": "function",
                    "function": {
                        "name": calls[i].name,
                        "arguments": "".join(calls[i].arguments) + "".join(calls[i].held),
                    },
                }
                for i in sorted(calls)
            ]
        if not self._id:
            self._id = "chatcmpl-" + uuid.uuid4().hex[:24]
        completion: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created or int(time.time()),
            "model": self._model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": self._finish_reason}
            ],
            "usage": self._usage,
        }
        if self._fingerprint is not None:
            completion["system_fingerprint"] = self._fingerprint
        return completion
