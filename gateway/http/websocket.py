"""WebSocket mode: ``ws(s)://…/v1/responses``, the Responses API over one long-lived socket.

As OpenAI's WebSocket mode (and the Open Responses spec): the client sends JSON text messages
``{"type": "response.create", …}`` whose other fields are a ``POST /v1/responses`` body
(``stream`` is implicit, ``background`` is refused); the server answers with the same events as
over SSE — one JSON text message per event, the same ``type``/payload/``sequence_number`` —
ending with ``response.completed`` / ``response.incomplete`` / ``response.failed``.

* One response in flight per connection: a ``response.create`` while one runs gets an ``error``
  event (409, code ``response_in_progress``) and the running one goes on.
* ``previous_response_id`` continues from the store as over HTTP, or from a connection-local
  cache of the responses created on this connection, which is how ``store: false`` responses
  are continued. A continuation that fails evicts the entry it continued from; an id neither
  knows gives an ``error`` event with code ``previous_response_not_found``.
* Errors are ``{"type": "error", "status": <HTTP status>, "error": {"type", "code", "message",
  "param"}}`` (openai-python's ``ResponseWsError``). A message that is not JSON, not an object,
  of an unknown ``type``, or larger than ``max_body_bytes`` gets one and the connection stays
  usable; a frame larger than the server's WebSocket limit (``stepchain serve``: max_body_bytes
  + 1 MiB, at least 16 MiB) is closed with 1009 by uvicorn.
* Auth: the upgrade request's ``Authorization: Bearer`` header, checked by
  :class:`gateway.http.auth.AuthMiddleware` (a bad key is refused with HTTP 401 before the
  handshake completes); the tenant is the one the key maps to, as over HTTP.
* A client that disconnects mid-response does not stop it (as over SSE): the response is an
  app-owned task that finishes and is stored (``cancel_on_disconnect`` cancels it instead).
* ``stream_id`` on a ``response.create`` is echoed on every event of that response.
* ``generate: false`` stores the request's state as a ``completed`` response with no output and
  no model call (a warm-up): its id continues as ``previous_response_id`` like any other.

The events come from the same :class:`gateway.engine.service.ResponsesService` and
:class:`gateway.protocol.events.ResponseBuilder` as SSE: this module only re-frames them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import orjson
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.engine.service import Prepared, ResponsesService
from gateway.errors import (
    ConflictError,
    GatewayError,
    InvalidRequestError,
    PreviousResponseNotFoundError,
    RequestTooLargeError,
    to_gateway_error,
)

from .bodies import MAX_DEPTH, _too_deep
from .state import gateway_state

__all__ = ["CACHE_SIZE", "error_event", "sse_to_message", "websocket_routes"]

logger = logging.getLogger("stepchain.websocket")

#: How many responses' histories one connection keeps for ``previous_response_id``.
CACHE_SIZE = 32

_DATA = b"\ndata: "


def sse_to_message(event: bytes, stream_id: str | None = None) -> bytes:
    """The JSON of one encoded SSE event (``event: t\\ndata: {…}\\n\\n``), as a WebSocket text
    message; with ``stream_id``, that field is added to the event object."""
    start = event.index(_DATA) + len(_DATA)
    data = event[start:-2]
    if stream_id is None:
        return data
    return b'{"stream_id":' + orjson.dumps(stream_id) + b"," + data[1:]


def error_event(exc: GatewayError, stream_id: str | None = None) -> bytes:
    """``{"type": "error", "status": …, "error": {type, code, message, param}}`` for ``exc``."""
    event: dict[str, Any] = {"type": "error", "status": exc.status_code, **exc.to_dict()}
    if stream_id is not None:
        event["stream_id"] = stream_id
    return orjson.dumps(event)


class _Connection:
    """One accepted socket: its tenant, cache, outbound queue and the response in flight."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        state = gateway_state(websocket)
        self.state = state
        self.service: ResponsesService = state.service
        self.limit: int = state.settings.max_body_bytes
        self.tenant: str | None = websocket.scope.get("stepchain.tenant")
        self.upstream_key: str | None = websocket.scope.get("stepchain.client_key")
        # response id -> every item of its conversation (inputs and outputs), oldest first.
        self.cache: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.open = True
        self.in_flight: str | None = None  # the response id running now

    def send(self, message: bytes) -> None:
        if self.open:
            self.outbox.put_nowait(message)

    async def writer(self) -> None:
        """Send queued messages in order, one text message each, until None or the client left."""
        while (message := await self.outbox.get()) is not None:
            try:
                await self.websocket.send_text(message.decode())
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.open = False
                return

    async def serve(self) -> None:
        writer = asyncio.ensure_future(self.writer())
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                await self.handle(raw)
        finally:
            self.open = False
            self.outbox.put_nowait(None)
            if self.in_flight and self.state.settings.cancel_on_disconnect:
                self.service.cancel(self.in_flight)
            if not writer.done():
                await asyncio.wait({writer}, timeout=5)
            if not writer.done():
                writer.cancel()

    async def handle(self, raw: str | bytes) -> None:
        if len(raw) > self.limit:  # characters for text: at most the bytes, checked again below
            if len(raw.encode() if isinstance(raw, str) else raw) > self.limit:
                self.send(error_event(RequestTooLargeError(
                    f"The message is larger than the limit of {self.limit} bytes."
                )))
                return
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.send(error_event(InvalidRequestError(
                f"The message is not valid JSON: {exc}", code="invalid_json"
            )))
            return
        if not isinstance(event, dict):
            self.send(error_event(InvalidRequestError(
                "A message must be a JSON object with a 'type'.", param="type", code="invalid_type"
            )))
            return
        kind = event.get("type")
        stream_id = event.get("stream_id") if isinstance(event.get("stream_id"), str) else None
        if kind == "response.steer":
            self.send(error_event(InvalidRequestError(
                "response.steer is not supported by this gateway; send the input with the next "
                "response.create and previous_response_id.",
                param="type", code="unsupported_event_type",
            ), stream_id))
            return
        if kind != "response.create":
            self.send(error_event(InvalidRequestError(
                f"Unknown event type {kind!r}; this server accepts 'response.create'.",
                param="type", code="unknown_event_type",
            ), stream_id))
            return
        try:
            await self.create(event, stream_id)
        except GatewayError as exc:
            self.send(error_event(exc, stream_id))
        except Exception as exc:  # a lower layer's error, translated at the one boundary
            error = to_gateway_error(exc)
            if error.status_code >= 500:
                logger.error("websocket response.create failed", exc_info=exc)
            self.send(error_event(error, stream_id))

    async def create(self, event: dict[str, Any], stream_id: str | None) -> None:
        if self.in_flight is not None:
            raise ConflictError(
                f"Response '{self.in_flight}' is still in progress on this connection; send the "
                "next response.create after its terminal event.",
                code="response_in_progress",
            )
        body = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
        if body.get("background") is True:
            raise InvalidRequestError(
                "background is not supported over a WebSocket.", param="background"
            )
        if _too_deep(body):
            raise InvalidRequestError(f"The message nests deeper than {MAX_DEPTH} levels.")
        body.pop("background", None)
        generate = body.pop("generate", None)
        if generate is not None and not isinstance(generate, bool):
            raise InvalidRequestError("generate must be a boolean.", param="generate")
        body["stream"] = True
        previous_id = body.get("previous_response_id")
        history = None
        if isinstance(previous_id, str) and previous_id in self.cache:
            history = self.cache[previous_id]
            self.cache.move_to_end(previous_id)
        try:
            prepared = await self.service.prepare(
                body, self.tenant, upstream_key=self.upstream_key, history=history
            )
        except PreviousResponseNotFoundError:
            raise
        except GatewayError:
            if history is not None:  # a failed continuation evicts what it continued from
                self.cache.pop(previous_id, None)
            raise
        self.in_flight = prepared.record.id
        self.start(prepared, stream_id, generate=generate is not False)

    def start(self, prepared: Prepared, stream_id: str | None, *, generate: bool = True) -> None:
        """Run the response as an app-owned task (it outlives this connection), its events
        sent here and kept in the live log (``GET …?stream=true`` can follow it)."""
        state = self.state
        response_id = prepared.record.id
        live = state.live.open(response_id)

        def emit(event: bytes) -> None:
            live.emit(event)
            self.send(sse_to_message(event, stream_id))

        async def run() -> None:
            previous_id = prepared.record.previous_response_id
            final: dict[str, Any] | None = None
            try:
                builder = self.service.builder(prepared, emit=emit)
                if generate:
                    final = await self.service.run(prepared, builder)
                else:
                    final = await self.service.record_only(prepared, builder)
            except Exception as exc:  # e.g. the record could not be created: nothing ran
                error = to_gateway_error(exc)
                if error.status_code >= 500:
                    logger.error("websocket response %s failed", response_id, exc_info=exc)
                self.send(error_event(error, stream_id))
            finally:
                # No await between the terminal event and here: the client's next
                # response.create cannot be read before the connection is free and cached.
                self.in_flight = None
                state.live.close(response_id)
            if final is None or final["status"] == "failed":
                if previous_id:
                    self.cache.pop(previous_id, None)
                return
            self.cache[response_id] = prepared.history + prepared.input_items + final["output"]
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)

        self.service.spawn(response_id, run())


async def responses_socket(websocket: WebSocket) -> None:
    """``/v1/responses`` upgraded to a WebSocket (see the module docstring)."""
    await websocket.accept()
    await _Connection(websocket).serve()


def websocket_routes() -> list[WebSocketRoute]:
    return [WebSocketRoute("/v1/responses", responses_socket)]
