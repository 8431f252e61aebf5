"""The ASGI response for Server-Sent Events bodies (``text/event-stream``).

Starlette's ``StreamingResponse`` runs a second task per response that waits for the client's
``http.disconnect`` (under ASGI spec < 2.4, which uvicorn reports) and cancels the body when it
comes. A stream here does not need that: the response it follows runs in its own task and goes
on whether or not anyone listens, and the body ends when the response's event log closes. After a
disconnect uvicorn drops further sends; a server on spec 2.4 raises ``OSError`` instead, which
ends the body at once. Dropping the extra task (and its anyio task group) is a measurable share of
a streamed response's CPU (bench scenario 2). A body that could outlive its response's own run
(a replay that polls the store for a response running elsewhere) asks for the watcher with
``watch_disconnect=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

__all__ = ["EventStreamResponse"]

_BASE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class EventStreamResponse:
    """Send ``chunks`` (already-encoded SSE bytes, e.g. ``b"event: …\\ndata: {…}\\n\\n"``) as a
    chunked ``200 text/event-stream`` body, one ``http.response.body`` message per chunk, then
    ``tail`` (e.g. ``data: [DONE]``) when the iterator ends.

    ``headers`` are extra response headers (lower-case names). The iterator is closed however the
    body ends (finished, client gone, or cancelled), so its ``finally`` blocks run. With
    ``watch_disconnect`` the body is also cancelled as soon as the client's ``http.disconnect``
    arrives (one extra task per response). ``ends(chunk)`` says a chunk is the stream's last
    (e.g. it ends with the terminal event): it goes out together with ``tail`` as the final
    body message, one write instead of two, and the iterator is closed without being asked for
    more.
    """

    __slots__ = ("chunks", "ends", "raw_headers", "status_code", "tail", "watch_disconnect")

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        tail: bytes = b"",
        headers: Mapping[str, str] | None = None,
        watch_disconnect: bool = False,
        ends: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.chunks = chunks
        self.ends = ends
        self.tail = tail
        self.watch_disconnect = watch_disconnect
        self.status_code = 200
        self.raw_headers = _BASE_HEADERS + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self.watch_disconnect:
            await self._send_all(send)
            return
        body = asyncio.ensure_future(self._send_all(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({body, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (body, watcher):
                task.cancel()
            await asyncio.gather(body, watcher, return_exceptions=True)
        if not body.cancelled() and body.exception() is not None:
            raise body.exception()  # type: ignore[misc]

    async def _send_all(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        chunks = self.chunks
        ends = self.ends
        try:
            async for chunk in chunks:
                if ends is not None and ends(chunk):
                    body = chunk + self.tail
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": self.tail, "more_body": False})
        except OSError:
            return  # the client went away (ASGI spec 2.4 servers): nothing left to send to
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
