"""``POST /v1/chat/completions``: passed through to the upstream, recorded as one model-call step
(:mod:`gateway.engine.chat`); streamed as the upstream's own chunks.

An upstream failure before the first chunk is an HTTP error by the one rule of
:func:`gateway.errors.upstream_error`; after it, an in-band ``{"error": …}`` chunk, as OpenAI does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import to_gateway_error
from gateway.protocol.sse import DONE

from .bodies import json_response, read_json, tenant_of
from .sse_response import EventStreamResponse
from .state import gateway_state

__all__ = ["chat_routes"]


async def chat_completions(request: Request) -> Response | EventStreamResponse:
    """Pass a Chat Completions request to the upstream, recorded as one model-call step."""
    service = gateway_state(request).service
    body = await read_json(request)
    tenant = tenant_of(request)
    upstream_key = request.scope.get("stepchain.client_key")
    if body.get("stream") is not True:
        completion = await service.chat_completion(body, tenant, upstream_key=upstream_key)
        return json_response(completion)

    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def on_chunk(chunk: dict[str, Any]) -> None:
        queue.put_nowait(b"data: " + orjson.dumps(chunk) + b"\n\n")

    task = service.tasks.spawn(
        service.chat_completion(body, tenant, upstream_key=upstream_key, on_chunk=on_chunk)
    )
    task.add_done_callback(lambda _t: queue.put_nowait(None))
    first = await queue.get()
    if first is None:
        exc = task.exception()
        if exc is not None:
            raise to_gateway_error(exc)  # an HTTP error: nothing was streamed yet
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


def chat_routes() -> list[Route]:
    return [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
