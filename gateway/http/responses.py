"""``/v1/responses`` routes: create (JSON, SSE or background), get (and re-attach to a stream),
cancel, delete, input items, and the step chain (a stepchain extension).

Shapes follow the OpenAI API (``shared/reference/responses-api.md``). Every error is raised as
a :class:`gateway.errors.GatewayError` and rendered once by the app's handler.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.engine.live import stored_events
from gateway.engine.service import Prepared, ResponsesService, record_to_object
from gateway.errors import GatewayError, InvalidRequestError, NotFoundError
from gateway.protocol.sse import DONE
from store.types import ResponseRecord

from .auth import caller_is_admin
from .bodies import json_response, read_json, tenant_of
from .sse_response import EventStreamResponse
from .state import gateway_state

__all__ = ["response_routes"]

logger = logging.getLogger("stepchain.http")

def _error_for_failure(prepared: Prepared) -> GatewayError:
    """The HTTP error for a response that failed before any output existed: the upstream's
    failure by the one rule of :func:`gateway.errors.upstream_error`, or a store failure (503)."""
    return prepared.failure or GatewayError()


# -- /v1/responses ---------------------------------------------------------------------------


async def create_response(request: Request) -> Response | EventStreamResponse:
    state = gateway_state(request)
    state.egress.note_own_socket(request.scope.get("server"))  # tools may not call us back
    service = state.service
    body = await read_json(request)
    prepared = await service.prepare(
        body, tenant_of(request), upstream_key=request.scope.get("stepchain.client_key")
    )
    trace_headers = _trace_headers(request.scope)
    if trace_headers is not None:
        prepared.trace_headers = trace_headers
    response_id = prepared.record.id
    stream = body.get("stream") is True
    background = body.get("background") is True
    if not stream and not background:
        # A task of its own: the response finishes and is stored even if the client leaves.
        task, _ = service.start(prepared, streamed=False)
        final = await asyncio.shield(task)
        if final["status"] == "failed" and not final["output"]:
            raise _error_for_failure(prepared)
        return json_response(final)

    task, live = service.start(prepared, streamed=True)
    assert live is not None
    if background and not stream:
        await live.wait_for(1)  # response.created: the record is in the store
        if live.end == 0:  # nothing published: the record could not be created
            await asyncio.shield(task)  # raises why
        return json_response(record_to_object(prepared.record))
    # Hold the headers until the first event after response.in_progress (or the end): a response
    # that fails before producing anything becomes an HTTP error the SDK can raise.
    await live.wait_for(3)
    if live.closed or live.events[-1].startswith(b"event: response.failed"):
        final = await asyncio.shield(task)
        if final["status"] == "failed" and not final["output"]:
            raise _error_for_failure(prepared)
    if state.settings.cancel_on_disconnect and not background:
        service.tasks.spawn(_cancel_on_disconnect(request, service, response_id, task))
    # If the client goes away, the response goes on and is stored (unless configured otherwise).
    return _sse(live.follow(0, service.store))


def _trace_headers(scope: dict[str, Any]) -> dict[str, str] | None:
    """The client's W3C trace context (the first ``traceparent``, and ``tracestate`` with it),
    read from the raw ASGI headers (lower-case names) as ``request.headers`` would give them."""
    traceparent = tracestate = None
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            if traceparent is None:
                traceparent = value.decode("latin-1")
        elif name == b"tracestate" and tracestate is None:
            tracestate = value.decode("latin-1")
    if not traceparent:
        return None
    found = {"traceparent": traceparent}
    if tracestate is not None:
        found["tracestate"] = tracestate
    return found


def _sse(events: AsyncIterator[bytes]) -> EventStreamResponse:
    return EventStreamResponse(events, tail=DONE)


async def _cancel_on_disconnect(
    request: Request, service: ResponsesService, response_id: str, task: asyncio.Task[Any]
) -> None:
    """Cancel the response when its client disconnects before it ended."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    done, _ = await asyncio.wait({watcher, task}, return_when=asyncio.FIRST_COMPLETED)
    if watcher in done and not task.done():
        service.cancel(response_id)
    watcher.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _visible(request: Request) -> ResponseRecord:
    response_id = request.path_params["response_id"]
    record = await gateway_state(request).service.get_visible(
        response_id, tenant_of(request), any_tenant=request.method == "GET" and caller_is_admin(request)
    )
    if record is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return record


async def get_response(request: Request) -> Response | EventStreamResponse:
    """``GET /v1/responses/{id}``; with ``?stream=true[&starting_after=N]`` the response's events
    after sequence number N as SSE, byte-identical to the original stream's, then the live ones,
    then ``[DONE]``: from this process's cache while it runs the response here, otherwise from
    the store's durable event log (any replica, any time while the response is stored)."""
    record = await _visible(request)
    if request.query_params.get("stream") not in ("true", "1"):
        return json_response(record_to_object(record))
    raw = request.query_params.get("starting_after", "-1")
    try:
        starting_after = int(raw)
    except ValueError:
        raise InvalidRequestError("starting_after must be an integer.", param="starting_after") from None
    service = gateway_state(request).service
    live = service.live.get(record.id)
    if live is not None and not live.closed:
        return _sse(live.follow(max(starting_after + 1, 0), service.store))
    # Following the store may wait for a response running elsewhere: stop when the client
    # leaves rather than when that response ends.
    return EventStreamResponse(
        stored_events(service, record, starting_after), tail=DONE, watch_disconnect=True
    )


async def cancel_response(request: Request) -> Response:
    """``POST /v1/responses/{id}/cancel``: stop a background response, on whichever replica
    runs it (a flag in the store its owner observes); it ends ``cancelled`` with its open steps
    ``canceled``. Answers once it has ended (or after ``CANCEL_WAIT_S`` with its state then).
    Only background responses can be cancelled; a finished one is returned as it is."""
    record = await _visible(request)
    record = await gateway_state(request).service.cancel_background(record)
    return json_response(record_to_object(record))


async def delete_response(request: Request) -> Response:
    record = await _visible(request)
    await gateway_state(request).service.delete(record)
    return json_response({"id": record.id, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    """``GET /v1/responses/{id}/input_items``: cursor pagination as OpenAI (after, limit, order)."""
    record = await _visible(request)
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be 'asc' or 'desc'.", param="order")
    raw_limit = query.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequestError("limit must be an integer from 1 to 100.", param="limit")
    limit = int(raw_limit)
    items = await gateway_state(request).service.input_items(record)
    if order == "desc":
        items = items[::-1]
    after = query.get("after")
    if after:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequestError(f"No input item with id '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


async def list_steps(request: Request) -> Response:
    """``GET /v1/responses/{id}/steps``: the recorded step chain (a stepchain extension).

    Every step of every scope by ``sequence``; ``?scope_parent=<step id>`` lists one sub-agent
    scope and ``?scope_parent=`` (empty) the top level only. Upstream and tool URLs are shown to
    the admin key only: tenants see the upstream's name (its label, else ``primary`` /
    ``fallback-N``) and ``<url>`` where a message quoted one.
    """
    record = await _visible(request)
    service = gateway_state(request).service
    if "scope_parent" in request.query_params:
        steps = await service.steps(record, request.query_params["scope_parent"] or None)
    else:
        steps = await service.steps(record)
    data = [_step_dict(s) for s in steps]
    if not caller_is_admin(request):
        data = [redact_urls(step, gateway_state(request).upstream_names) for step in data]
    return json_response({"object": "list", "data": data})


def _step_dict(step: Any) -> dict[str, Any]:
    return {"object": "response.step", **{name: getattr(step, name) for name in step.__slots__}}


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _URL.sub("<url>", value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def redact_urls(step: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A step as a tenant sees it: upstreams by name, no URL in errors or attempts."""

    def name_of(upstream: Any) -> Any:
        if not isinstance(upstream, str):
            return upstream
        return names.get(upstream) or ("upstream" if "://" in upstream else upstream)

    out = dict(step)
    out["upstream"] = name_of(out.get("upstream"))
    attempts = []
    for attempt in out.get("attempts") or ():
        if isinstance(attempt, dict) and "upstream" in attempt:
            attempt = {**attempt, "upstream": name_of(attempt["upstream"])}
        attempts.append(_scrub(attempt))
    out["attempts"] = attempts
    out["error"] = _scrub(out.get("error"))
    return out


def response_routes() -> list[Route]:
    return [
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
        Route("/v1/responses/{response_id}/steps", list_steps, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
    ]
