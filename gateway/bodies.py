"""Reading JSON request bodies: a size cap, a nesting cap, and OpenAI-shaped errors.

orjson reads up to 1,024 levels of nesting but writes at most 254, so a body deeper than
:data:`MAX_DEPTH` is refused here, before anything tries to store it.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from .errors import InvalidRequestError, RequestTooLargeError

__all__ = ["MAX_DEPTH", "read_json_body"]

MAX_DEPTH = 128
# Fewer brackets than this cannot nest deeper than MAX_DEPTH: skip the walk (the usual case).
_BRACKETS_BEFORE_WALK = MAX_DEPTH


async def read_json_body(request: Request, limit: int) -> Any:
    """The parsed JSON body. 413 past ``limit`` bytes (declared or received), 400 if it is
    not JSON or nests deeper than MAX_DEPTH levels."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"Request body is larger than the limit of {limit} bytes.")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"Request body is larger than the limit of {limit} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequestError("The client disconnected before sending the whole body.") from None
    raw = b"".join(chunks)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None
    if raw.count(b"[") + raw.count(b"{") > _BRACKETS_BEFORE_WALK and _too_deep(body):
        raise InvalidRequestError(f"The request body nests deeper than {MAX_DEPTH} levels.")
    return body


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
