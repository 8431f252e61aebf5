"""JSON in and out of the HTTP routes: request bodies with a size and nesting cap and
OpenAI-shaped errors, JSON responses, and the caller's tenant.

orjson reads up to 1,024 levels of nesting but writes at most 254, so a body deeper than
:data:`MAX_DEPTH` is refused here, before anything tries to store it.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.errors import InvalidRequestError, RequestTooLargeError

from .state import gateway_state

__all__ = ["JSON", "MAX_DEPTH", "json_response", "read_json", "read_json_body", "tenant_of"]

MAX_DEPTH = 128
# Fewer brackets than this cannot nest deeper than MAX_DEPTH: skip the walk (the usual case).
_BRACKETS_BEFORE_WALK = MAX_DEPTH


async def read_json_body(request: Request, limit: int) -> Any:
    """The parsed JSON body. 413 past ``limit`` bytes (declared or received), 400 if it is
    not JSON or nests deeper than MAX_DEPTH levels."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"Request body is larger than the limit of {limit} bytes.")
    raw = await _receive_body(request, limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None
    if raw.count(b"[") + raw.count(b"{") > _BRACKETS_BEFORE_WALK and _too_deep(body):
        raise InvalidRequestError(f"The request body nests deeper than {MAX_DEPTH} levels.")
    return body


async def _receive_body(request: Request, limit: int) -> bytes:
    """The body as ``request.stream()`` yields it (this is that loop, without an async
    generator per request); 413 past ``limit`` bytes, 400 if the client disconnects first."""
    if "_body" in request.__dict__ or request._stream_consumed:  # (hasattr: a dropped error)
        chunks = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise _disconnected() from None
        return b"".join(chunks)
    receive = request.receive
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        request._stream_consumed = True  # the whole body in one message: the usual case
        raw: bytes = message.get("body", b"")
        if len(raw) > limit:
            raise _too_large(limit)
        return raw
    chunks = []
    size = 0
    while True:
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                request._stream_consumed = True
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            request._is_disconnected = True
            raise _disconnected()
        message = await receive()


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"Request body is larger than the limit of {limit} bytes.")


def _disconnected() -> InvalidRequestError:
    return InvalidRequestError("The client disconnected before sending the whole body.")


def _too_deep(value: Any) -> bool:
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        nested: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nested.extend(v for v in item.values() if isinstance(v, (dict, list)))
            elif isinstance(item, list):
                nested.extend(v for v in item if isinstance(v, (dict, list)))
        if not nested:
            return False
        level = nested
    return True


JSON = "application/json"


def json_response(data: Any, status: int = 200) -> Response:
    """``data`` as an ``application/json`` response (orjson)."""
    return Response(orjson.dumps(data), status_code=status, media_type=JSON)


def tenant_of(request: Request) -> str | None:
    """The tenant the authentication middleware found for this request (None when open)."""
    return request.scope.get("stepchain.tenant")


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (see :func:`read_json_body`); 400 for anything else."""
    body = await read_json_body(request, gateway_state(request).settings.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return body
