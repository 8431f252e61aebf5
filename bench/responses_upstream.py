"""The bench upstream's ``POST /v1/responses`` mode: the same scripted model, in the Responses API.

Peers such as vLLM's ``agentic-api`` forward ``/v1/responses`` to an upstream that speaks the
Responses API itself (vLLM does), not Chat Completions. This ASGI app answers such calls from the
same script as the Chat Completions route (:func:`bench.upstream.bench_reply`): the request's
``instructions`` and ``input`` items become the chat messages the script reads, and its
:class:`~gateway.testing.scripted_upstream.Reply` becomes a ``Response`` object (non-streamed) or
the Responses event sequence (streamed: ``response.created`` … ``response.completed``, text in
``chunk_size``-character deltas, all events sent in one write, as the chat route does for a
fault-free reply). Tool calls become ``function_call`` items. Nothing is stored: this is an
upstream, ``previous_response_id`` is not supported (peers send the whole history).

Shapes follow openai-python's ``types/responses/`` (Response, ResponseOutputMessage,
ResponseFunctionToolCall, the stream events).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from gateway.testing.scripted_upstream import Reply

__all__ = ["ResponsesMode", "chat_body_from_responses"]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def _part_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def chat_body_from_responses(body: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions body the script reads for a Responses request body.

    ``instructions`` → a system message; message items → ``{"role", "content"}``;
    ``function_call`` → an assistant message with ``tool_calls``; ``function_call_output`` → a
    ``tool`` message; function tools → chat tools. Other item types are skipped.
    """
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _part_text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}  # fmt: skip
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _part_text(output)})  # fmt: skip
    tools = [
        {"type": "function", "function": {"name": t.get("name"), "parameters": t.get("parameters") or {}}}
        for t in body.get("tools") or ()
        if isinstance(t, dict) and t.get("type") == "function"
    ]
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if tools:
        chat["tools"] = tools
    return chat


def _usage(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    prompt = max(1, sum((len(_part_text(m.get("content"))) + 3) // 4 for m in body["messages"]))
    completion = (len(reply.content or "") + 3) // 4 + sum(
        (len(c.get("arguments", "")) + 3) // 4 for c in reply.tool_calls
    )
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }  # fmt: skip


def _response(rid: str, model: str, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "model": model, "output": output, "usage": usage, "error": None,
        "incomplete_details": None, "instructions": None, "metadata": {},
        "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
        "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled",
    }  # fmt: skip


def _output(reply: Reply) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = []
    if reply.content is not None:
        output.append({
            "type": "message", "id": "msg_" + uuid.uuid4().hex, "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": reply.content, "annotations": []}],
        })  # fmt: skip
    for call in reply.tool_calls:
        output.append({
            "type": "function_call", "id": "fc_" + uuid.uuid4().hex, "status": "completed",
            "call_id": call["id"], "name": call["name"], "arguments": call.get("arguments", ""),
        })  # fmt: skip
    return output


def _events(rid: str, model: str, reply: Reply, usage: dict[str, Any]) -> bytes:
    seq = 0
    out: list[bytes] = []

    def emit(event: dict[str, Any]) -> None:
        nonlocal seq
        event["sequence_number"] = seq
        seq += 1
        out.append(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")

    emit({"type": "response.created", "response": _response(rid, model, "in_progress", [], None)})
    emit({"type": "response.in_progress", "response": _response(rid, model, "in_progress", [], None)})
    items = _output(reply)
    for index, item in enumerate(items):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            opened = {**item, "status": "in_progress", "content": []}
            emit({"type": "response.output_item.added", "output_index": index, "item": opened})
            empty = {"type": "output_text", "text": "", "annotations": []}
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            emit({"type": "response.content_part.added", **common, "part": empty})
            size = max(reply.chunk_size, 1)
            for i in range(0, len(text), size):
                emit({"type": "response.output_text.delta", **common, "delta": text[i : i + size], "logprobs": []})
            emit({"type": "response.output_text.done", **common, "text": text, "logprobs": []})
            emit({"type": "response.content_part.done", **common, "part": item["content"][0]})
        else:
            emit({"type": "response.output_item.added", "output_index": index,
                  "item": {**item, "status": "in_progress", "arguments": ""}})  # fmt: skip
            emit({"type": "response.function_call_arguments.done", "item_id": item["id"],
                  "output_index": index, "arguments": item["arguments"]})  # fmt: skip
        emit({"type": "response.output_item.done", "output_index": index, "item": item})
    emit({"type": "response.completed", "response": _response(rid, model, "completed", items, usage)})
    return b"".join(out)


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class ResponsesMode:
    """``POST /v1/responses`` as a plain ASGI app, answering from ``script(chat_body)``."""

    def __init__(self, script: Callable[[dict[str, Any]], Reply | str]) -> None:
        self.script = script

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            body = orjson.loads(await _read_body(receive))
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            error = {"message": "The body is not a JSON object.", "type": "invalid_request_error",
                     "param": None, "code": None}  # fmt: skip
            await send({"type": "http.response.start", "status": 400, "headers": _JSON_HEADERS})
            await send({"type": "http.response.body", "body": orjson.dumps({"error": error})})
            return
        chat = chat_body_from_responses(body)
        reply = self.script(chat)
        if isinstance(reply, str):
            reply = Reply(content=reply)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        rid = "resp_" + uuid.uuid4().hex
        model = body.get("model") or "scripted-model"
        usage = _usage(chat, reply)
        if not body.get("stream"):
            payload = _response(rid, model, "completed", _output(reply), usage)
            await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
            await send({"type": "http.response.body", "body": orjson.dumps(payload)})
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": _events(rid, model, reply, usage)})
