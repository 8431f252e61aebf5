"""A scripted Chat Completions server: no network, no model. For tests, the demo and benchmarks.

:func:`create_scripted_upstream` returns a starlette app serving ``POST /v1/chat/completions``
(streamed or not; ``stream_options.include_usage`` honoured), ``GET /v1/models`` and, when
``ScriptedModel.tokenize`` is set, vLLM's ``POST /tokenize``. A *script*
picks each :class:`Reply` from the request body: a callable ``(body) -> Reply``, a list of Replies
answered in order, or a :class:`ScriptedModel` (a queue of Replies, then its ``default``), which
also records every request body it received::

    model = ScriptedModel()
    model.replies.append(Reply(content="Hello!", chunk_size=3))
    with serve_app(create_scripted_upstream(model)) as url:   # base URL for clients: url + "/v1"
        ...
    assert model.requests[-1]["messages"][-1]["content"] == "Hi"

Streams look like OpenAI's on the wire: ``data: {json}\\n\\n`` per chunk; a first chunk with the
role; reasoning (as ``reasoning_content``, or ``reasoning``), refusal and content in ``chunk_size``-character pieces;
tool-call pieces keyed by ``index`` with ``id``/``name`` only in the first piece and the arguments
split into pieces; a finish chunk; a usage chunk with ``choices: []`` when asked for; ``[DONE]``.

Fault modes on a Reply (for resilience tests): ``status`` ≠ 200 answers an OpenAI-shaped error
(``Retry-After`` from ``retry_after``); the others apply to streamed replies and count chunks from
the first (role) chunk: ``drop_after_chunks`` closes the connection mid-body, ``garbage_after_chunks``
sends a ``data: {not json`` event and then the rest, ``stall_after_chunks`` sends nothing more until
the client disconnects.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "SCRIPTED_MODEL_ID",
    "Reply",
    "Script",
    "ScriptedModel",
    "create_scripted_upstream",
    "default_reply",
]

SCRIPTED_MODEL_ID = "scripted-model"
# A stalled stream waits at most this long for the client to give up.
_STALL_S = 3600.0
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_DONE = b"data: [DONE]\n\n"
_GARBAGE = b"data: {not json\n\n"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found_error",
    429: "rate_limit_error",
}


@dataclass
class Reply:
    """What the scripted model answers to one request (see the module docstring for faults).

    ``finish_reason`` defaults to ``"tool_calls"`` if there are tool calls, else ``"stop"``;
    ``usage`` defaults to rough counts (about four characters a token) of the request and reply
    text. ``tool_calls`` items are ``{"id", "name", "arguments"}`` (``arguments`` a JSON string).
    ``reasoning`` is sent in the message field ``reasoning_field``: ``reasoning_content``
    (DeepSeek, vLLM's older reasoning parsers, llama.cpp) or ``reasoning`` (vLLM ≥ 0.10,
    OpenRouter, Ollama). Times are seconds.
    """

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"
    refusal: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunk_size: int = 8
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    status: int = 200
    error_code: str | None = None
    retry_after: float | None = None
    drop_after_chunks: int | None = None
    garbage_after_chunks: int | None = None
    stall_after_chunks: int | None = None


class ScriptedModel:
    """Replies from ``replies`` in order, then from ``default(body)``; records ``requests``.

    ``streams_finished`` counts streamed replies whose last byte has been sent (so a test can tell
    that something reached its client while the upstream was still streaming). All are safe to
    read or append to from the test's thread while the server runs in another. Pass
    ``record=False`` for long benchmark runs.
    """

    def __init__(
        self,
        replies: Iterable[Reply | str] = (),
        default: Callable[[dict[str, Any]], Reply | str] | None = None,
        *,
        record: bool = True,
    ) -> None:
        self.replies: collections.deque[Reply | str] = collections.deque(replies)
        self.requests: list[dict[str, Any]] = []
        self.default = default or default_reply
        self.record = record
        self.streams_finished = 0
        # POST /tokenize (vLLM's form) answers only when set; otherwise 404, as OpenAI's API.
        self.tokenize = False
        self.tokenize_requests: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        if self.record:
            self.requests.append(body)
        try:
            return self.replies.popleft()
        except IndexError:
            return self.default(body)


Script = Union[ScriptedModel, Callable[[dict[str, Any]], Union[Reply, str]], list[Reply]]


# --- the default script -------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_SPLIT_NAME = re.compile(r"[_\-\s.]+|(?<=[a-z0-9])(?=[A-Z])")
_GENERIC = frozenset({"get", "set", "fetch", "call", "run", "tool", "do", "make", "the", "api"})
_SUBJECT = re.compile(r"\b(?:in|for|of|about|at|on|to)\s+([^?!.,;]+)", re.IGNORECASE)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text") or "" for part in content if isinstance(part, dict)
        )
    return ""


def default_reply(body: dict[str, Any]) -> Reply:
    """A rule-based answer, enough for the demo and the benchmarks.

    After ``tool`` messages: ``"Tool results: "`` and their outputs joined by ``"; "``. Else, when a
    tool is offered (and ``tool_choice`` is not ``"none"``) whose name has a word (e.g. ``weather``
    in ``get_weather``) that appears in the last user text: a call to it, its first string
    parameter filled with the words after the last "in/for/of/about/at/on/to" (else the whole
    text). Else ``"Echo: <last user text>"``.
    """
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        outputs = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            outputs.append(_text(message.get("content")))
        return Reply(content="Tool results: " + "; ".join(reversed(outputs)))
    user_text = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            user_text = _text(message.get("content"))
            break
    if body.get("tools") and body.get("tool_choice") != "none" and messages:
        if messages[-1].get("role") == "user":
            words = set(_WORD.findall(user_text.lower()))
            for tool in body["tools"]:
                function = tool.get("function") or {}
                name = function.get("name") or ""
                parts = {p.lower() for p in _SPLIT_NAME.split(name) if p}
                if parts & words - _GENERIC:
                    arguments = _fill_arguments(function.get("parameters") or {}, user_text)
                    return Reply(
                        tool_calls=[
                            {"id": "call_" + uuid.uuid4().hex[:24], "name": name,
                             "arguments": orjson.dumps(arguments).decode()}
                        ]
                    )
    return Reply(content="Echo: " + user_text)


def _fill_arguments(parameters: dict[str, Any], text: str) -> dict[str, Any]:
    properties = parameters.get("properties") or {}
    for key, schema in properties.items():
        if isinstance(schema, dict) and schema.get("type") == "string":
            matches = _SUBJECT.findall(text)
            return {key: matches[-1].strip() if matches else text}
    return {}


# --- serving ------------------------------------------------------------------------------------


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, sum(_tokens(_text(m.get("content"))) for m in body.get("messages") or ()))


def _usage(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    if reply.usage is not None:
        return reply.usage
    reasoning = _tokens(reply.reasoning or "")
    completion = (
        _tokens(reply.content or "")
        + _tokens(reply.refusal or "")
        + reasoning
        + sum(_tokens(c.get("name", "")) + _tokens(c.get("arguments", "")) for c in reply.tool_calls)
    )
    prompt = _prompt_tokens(body)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _finish_reason(reply: Reply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _pieces(text: str, size: int) -> list[str]:
    size = max(size, 1)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _completion(reply: Reply, body: dict[str, Any], model: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.content,
        "refusal": reply.refusal,
    }
    if reply.reasoning:
        message[reply.reasoning_field] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c.get("arguments", "")}}
            for c in reply.tool_calls
        ]
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_scripted",
        "choices": [
            {"index": 0, "message": message, "logprobs": None,
             "finish_reason": _finish_reason(reply)}
        ],
        "usage": _usage(reply, body),
    }


def _stream_events(reply: Reply, body: dict[str, Any], model: str) -> list[bytes]:
    """The reply as SSE events, each ``data: {chunk}\\n\\n``, ending with ``data: [DONE]``."""
    head = b"".join(
        (
            b'data: {"id":"chatcmpl-', uuid.uuid4().hex[:24].encode(),
            b'","object":"chat.completion.chunk","created":', str(int(time.time())).encode(),
            b',"model":', orjson.dumps(model),
            b',"system_fingerprint":"fp_scripted","choices":',
        )
    )
    open_choice = head + b'[{"index":0,"delta":'
    close_choice = b',"logprobs":null,"finish_reason":null}]}\n\n'
    size = reply.chunk_size
    first: dict[str, Any] = {
        "role": "assistant",
        "content": "" if reply.content is not None else None,
        "refusal": None,
    }
    events = [open_choice + orjson.dumps(first) + close_choice]
    for key, text in (
        (reply.reasoning_field, reply.reasoning),
        ("refusal", reply.refusal),
        ("content", reply.content),
    ):
        if text:
            for piece in _pieces(text, size):
                events.append(open_choice + orjson.dumps({key: piece}) + close_choice)
    for index, call in enumerate(reply.tool_calls):
        opening = {
            "index": index, "id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        events.append(open_choice + orjson.dumps({"tool_calls": [opening]}) + close_choice)
        for piece in _pieces(call.get("arguments", ""), size):
            piece_delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            events.append(open_choice + orjson.dumps(piece_delta) + close_choice)
    events.append(
        open_choice + b'{},"logprobs":null,"finish_reason":'
        + orjson.dumps(_finish_reason(reply)) + b"}]}\n\n"
    )
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(head + b'[],"usage":' + orjson.dumps(_usage(reply, body)) + b"}\n\n")
    events.append(_DONE)
    return events


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, payload: Any, headers: list[Any] | None = None) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": headers or _JSON_HEADERS}
    )
    await send({"type": "http.response.body", "body": orjson.dumps(payload)})


def _error_body(reply: Reply) -> dict[str, Any]:
    status = reply.status
    etype = _ERROR_TYPES.get(status, "server_error")
    if reply.error_code == "insufficient_quota":
        etype = "insufficient_quota"
    message = {
        "insufficient_quota": "You exceeded your current quota, please check your plan.",
        "rate_limit_exceeded": "Rate limit reached for requests.",
    }.get(reply.error_code or "", f"The scripted upstream failed with HTTP {status}.")
    return {"error": {"message": message, "type": etype, "param": None, "code": reply.error_code}}


class _ChatCompletions:
    """``POST /v1/chat/completions`` as a plain ASGI app: the benchmark's upstream, so lean."""

    def __init__(self, script: Callable[[dict[str, Any]], Reply | str]) -> None:
        self.script = script
        self.model = script if isinstance(script, ScriptedModel) else None

    def _finished(self) -> None:
        if self.model is not None:
            self.model.streams_finished += 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = orjson.loads(await _read_body(receive))
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            error = {"message": "The body is not a JSON object.", "type": "invalid_request_error",
                     "param": None, "code": None}
            await _send_json(send, 400, {"error": error})
            return
        reply = self.script(body)
        if isinstance(reply, str):
            reply = Reply(content=reply)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            headers = _JSON_HEADERS
            if reply.retry_after is not None:
                headers = [*headers, (b"retry-after", f"{reply.retry_after:g}".encode())]
            await _send_json(send, reply.status, _error_body(reply), headers)
            return
        model = body.get("model") or SCRIPTED_MODEL_ID
        if not body.get("stream"):
            await _send_json(send, 200, _completion(reply, body, model))
            return
        events = _stream_events(reply, body, model)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        faulty = (
            reply.drop_after_chunks is not None
            or reply.garbage_after_chunks is not None
            or reply.stall_after_chunks is not None
        )
        if not faulty and not reply.chunk_delay_s:
            await send({"type": "http.response.body", "body": b"".join(events)})
            self._finished()
            return
        # A slow stream stops when its client goes away, as a real model server's would.
        gone = None
        if reply.chunk_delay_s and reply.stall_after_chunks is None:
            gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            for sent, event in enumerate(events):
                if sent == reply.drop_after_chunks:
                    return  # uvicorn closes the connection: the body ends mid-way
                if sent == reply.stall_after_chunks:
                    await asyncio.wait_for(_until_disconnect(receive), _STALL_S)
                    return
                if sent == reply.garbage_after_chunks:
                    await send({"type": "http.response.body", "body": _GARBAGE, "more_body": True})
                if sent and reply.chunk_delay_s:
                    await asyncio.sleep(reply.chunk_delay_s)
                    if gone is not None and gone.done():
                        return
                await send({"type": "http.response.body", "body": event, "more_body": True})
        finally:
            if gone is not None:
                gone.cancel()
        await send({"type": "http.response.body", "body": b""})
        self._finished()


async def _models(request: Request) -> Response:
    data = {"id": SCRIPTED_MODEL_ID, "object": "model", "created": 0, "owned_by": "stepchain"}
    return Response(orjson.dumps({"object": "list", "data": [data]}), media_type="application/json")


def tokenize_count(body: dict[str, Any]) -> int:
    """The scripted tokenizer: one token per whitespace-separated word of each message's text,
    plus 3 per message (deliberately unlike the four-characters estimate)."""
    messages = body.get("messages") or ()
    return sum(len(_text(m.get("content")).split()) + 3 for m in messages if isinstance(m, dict))


async def _tokenize(request: Request) -> Response:
    """vLLM's ``POST /tokenize`` with ``messages``: ``{"count", "max_model_len", "tokens"}``."""
    model = request.app.state.model
    if model is None or not model.tokenize:
        return Response(b'{"detail":"Not Found"}', status_code=404, media_type="application/json")
    body = orjson.loads(await request.body())
    model.tokenize_requests.append(body)
    count = tokenize_count(body)
    payload = {"count": count, "max_model_len": 8192, "tokens": list(range(count))}
    return Response(orjson.dumps(payload), media_type="application/json")


def create_scripted_upstream(script: Script | None = None) -> Starlette:
    """The scripted upstream app; ``script`` defaults to a fresh :class:`ScriptedModel`.

    The ScriptedModel in use (when the script is one, or was built from a list) is
    ``app.state.model``.
    """
    if script is None or isinstance(script, list):
        script = ScriptedModel(script or ())
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _ChatCompletions(script), methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/tokenize", _tokenize, methods=["POST"]),
        ]
    )
    app.state.model = script if isinstance(script, ScriptedModel) else None
    return app
