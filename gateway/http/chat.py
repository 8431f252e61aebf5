"""``POST /v1/chat/completions``: passed through to the upstream, recorded as one model-call step.

The body goes upstream as it came (the upstream's own errors come back with their status); the
call is a response record of its own (``store: false``, ``metadata.endpoint =
"chat.completions"``) with one model-call step, so it shows in the step listing and recovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from executors.upstream import UpstreamError as UpstreamCallError
from gateway.errors import InvalidRequestError, to_gateway_error
from gateway.protocol.sse import DONE
from store.types import MODEL_CALL, ResponseRecord, StepDescriptor, new_id

from .bodies import json_response, read_json, tenant_of
from .sse_response import EventStreamResponse

__all__ = ["chat_routes"]


async def chat_completions(request: Request) -> Response | EventStreamResponse:
    """Pass a Chat Completions request to the upstream, recorded as one model-call step."""
    state = request.app.state
    body = await read_json(request)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequestError("model is required.", param="model")
    if not isinstance(body.get("messages"), list):
        raise InvalidRequestError("messages must be a list.", param="messages")
    store = state.service.store
    record = ResponseRecord(
        id=new_id("resp"),
        model=body["model"],
        request=body,
        tenant=tenant_of(request),
        created_at=time.time(),
        store=False,  # a chat completion is not a Responses API response
        metadata={"endpoint": "chat.completions"},
    )
    service = state.service
    (step,) = await store.create_response(
        record, owner=service.owner, lease_s=service.lease_s,
        first_steps=[StepDescriptor(MODEL_CALL, body)],
    )
    upstream = state.upstream
    client_key = request.scope.get("stepchain.client_key")
    if client_key:
        upstream = upstream.with_api_key(client_key)
    answered_by: list[str] = []

    async def on_attempt(error: dict[str, Any] | None, label: str) -> None:
        if error is None:
            answered_by.append(label)  # stored with the completion
        else:
            await store.record_attempt(step.id, error, label)

    async def complete(completion: dict[str, Any]) -> None:
        await store.complete_step(
            step.id, completion, completion.get("usage"),
            upstream=answered_by[-1] if answered_by else None,
            response_update={"status": "completed", "completed_at": time.time()},
        )

    if body.get("stream") is not True:
        try:
            completion = await upstream.chat_completion(body, on_attempt=on_attempt)
        except UpstreamCallError as exc:
            await _fail_chat(store, record.id, step.id, exc)
            raise to_gateway_error(exc) from exc
        await complete(completion)
        return json_response(completion)

    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def on_chunk(chunk: dict[str, Any]) -> None:
        queue.put_nowait(b"data: " + orjson.dumps(chunk) + b"\n\n")

    async def run() -> None:
        try:
            completion = await upstream.chat_completion(body, on_chunk=on_chunk, on_attempt=on_attempt)
        except UpstreamCallError as exc:
            await _fail_chat(store, record.id, step.id, exc)
            raise to_gateway_error(exc) from exc  # an expected failure: not logged as a bug
        await complete(completion)

    task = state.tasks.spawn(run())
    task.add_done_callback(lambda _t: queue.put_nowait(None))
    first = await queue.get()
    if first is None:
        exc = task.exception()
        if exc is not None:
            raise to_gateway_error(exc)
        return EventStreamResponse(_nothing(), tail=DONE)

    async def drain() -> AsyncIterator[bytes]:
        chunk: bytes | None = first
        while chunk is not None:
            yield chunk
            chunk = await queue.get()
        if task.exception() is not None:
            # The stream broke after it started: tell the client in-band, as OpenAI does.
            yield b"data: " + orjson.dumps(to_gateway_error(task.exception()).to_dict()) + b"\n\n"
            return
        yield DONE

    return EventStreamResponse(drain())


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


async def _fail_chat(store, response_id: str, step_id: str, exc: UpstreamCallError) -> None:
    await store.fail_step(step_id, {"type": exc.type, "message": str(exc)}, exc.partial)
    await store.update_response(
        response_id,
        status="failed",
        error={"code": "server_error", "message": str(exc)},
        completed_at=time.time(),
    )


def chat_routes() -> list[Route]:
    return [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
