"""``POST /v1/chat/completions`` passed through to the upstream, recorded as one model-call step.

The body goes upstream as it came (the upstream's own errors come back through the one rule of
:func:`gateway.errors.upstream_error`); the call is a response record of its own (``store:
false``, ``metadata.endpoint = "chat.completions"``) with one model-call step, so it shows in
the step listing and recovery (which ends it ``failed``: its client is gone).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from executors.resilience import ResilientUpstream
from executors.upstream import UpstreamError
from gateway.errors import InvalidRequestError
from gateway.observe.hooks import Observer
from store.base import Store
from store.types import MODEL_CALL, ResponseRecord, StepDescriptor, new_id

__all__ = ["ENDPOINT", "run_chat_completion", "validate_chat_request"]

#: ``metadata.endpoint`` of the records these calls leave.
ENDPOINT = "chat.completions"


def validate_chat_request(body: dict[str, Any]) -> None:
    """The little the gateway checks itself (the upstream checks the rest).

    Raises InvalidRequestError naming ``model`` or ``messages``.
    """
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequestError("model is required.", param="model")
    if "\x00" in body["model"]:
        raise InvalidRequestError("model must not contain NUL characters.", param="model")
    if not isinstance(body.get("messages"), list):
        raise InvalidRequestError("messages must be a list.", param="messages")


async def run_chat_completion(
    store: Store,
    upstream: ResilientUpstream,
    body: dict[str, Any],
    *,
    tenant: str | None,
    owner: str | None,
    lease_s: float,
    on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    observer: Observer | None = None,
) -> dict[str, Any]:
    """Record the call, make it (streamed when ``body["stream"]`` is true: each chunk to
    ``on_chunk``), store its completion or failure; returns the completion. ``observer``
    (gateway.observe) sees the step as the loop's model calls are seen: metrics, span, log.

    Raises InvalidRequestError (before anything is written), executors' UpstreamError (the step
    and the record are failed first) and StoreError.
    """
    validate_chat_request(body)
    record = ResponseRecord(
        id=new_id("resp"),
        model=body["model"],
        request=body,
        tenant=tenant,
        created_at=time.time(),
        store=False,  # a chat completion is not a Responses API response
        metadata={"endpoint": ENDPOINT},
    )
    (step,) = await store.create_response(
        record, owner=owner, lease_s=lease_s, first_steps=[StepDescriptor(MODEL_CALL, body)]
    )
    answered_by: list[str] = []

    async def on_attempt(error: dict[str, Any] | None, label: str) -> None:
        if error is None:
            answered_by.append(label)  # stored with the completion
        else:
            await store.record_attempt(step.id, error, label)

    with contextlib.nullcontext() if observer is None else observer.step(step) as scope:
        try:
            completion = await upstream.chat_completion(body, on_chunk=on_chunk, on_attempt=on_attempt)
        except UpstreamError as exc:
            failed = await store.fail_step(step.id, {"type": exc.type, "message": str(exc)}, exc.partial)
            await store.update_response(
                record.id,
                status="failed",
                error={"code": "server_error", "message": str(exc)},
                completed_at=time.time(),
            )
            if scope is not None:
                scope.finish(failed)
            raise
        done = await store.complete_step(
            step.id, completion, completion.get("usage"),
            upstream=answered_by[-1] if answered_by else None,
            response_update={"status": "completed", "completed_at": time.time()},
        )
        if scope is not None:
            scope.finish(done)
    return completion
