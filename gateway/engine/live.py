"""Live event logs: one per streamed response, so any number of clients can follow it.

The streaming client of ``POST /v1/responses`` is just the first follower of its response's
log; a client that lost its connection re-attaches with ``GET /v1/responses/{id}?stream=true
&starting_after=N`` and receives exactly the events after sequence number N (event *i* of the
log has ``sequence_number`` *i*), then the live ones. A log is kept for ``ttl_s`` seconds after
its response ends; later (or on another replica) the events are rebuilt from the stored chain.

Memory is bounded by bytes: a finished log larger than ``max_bytes_per_response`` is dropped at
once, and finished logs are dropped oldest first while all logs together hold more than
``max_bytes`` (running logs are never cut: their clients are reading them). A dropped log costs
nothing but a rebuild from the store when someone asks for it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from gateway.protocol.events import ResponseBuilder

__all__ = ["LiveStream", "LiveStreams", "replay_events"]


class LiveStream:
    """The encoded SSE events of one running response, in sequence order."""

    __slots__ = ("events", "closed", "size", "_changed", "_owner")

    def __init__(self, owner: LiveStreams | None = None) -> None:
        self.events: list[bytes] = []
        self.closed = False
        self.size = 0  # bytes held
        self._changed = asyncio.Event()
        self._owner = owner

    def emit(self, event: bytes) -> None:
        """Append one encoded event (the ResponseBuilder's ``emit``)."""
        self.events.append(event)
        self.size += len(event)
        if self._owner is not None:
            self._owner.total_bytes += len(event)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        """Until the log holds ``count`` events or is closed."""
        while len(self.events) < count and not self.closed:
            self._changed.clear()
            await self._changed.wait()

    async def follow(self, start: int = 0) -> AsyncIterator[bytes]:
        """Yield events from index ``start`` on, as they come, until the log closes.

        Events already waiting are joined into one chunk: one write instead of many.
        """
        i = start
        while True:
            n = len(self.events)
            if i < n:
                yield self.events[i] if n - i == 1 else b"".join(self.events[i:n])
                i = n
                continue
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()


class LiveStreams:
    """The live logs of this process, by response id, each kept ``ttl_s`` after it closes,
    within ``max_bytes`` in all and ``max_bytes_per_response`` per finished log."""

    def __init__(
        self,
        ttl_s: float = 300.0,
        *,
        max_bytes: int = 256_000_000,
        max_bytes_per_response: int = 16_000_000,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.max_bytes_per_response = max_bytes_per_response
        self.total_bytes = 0
        self._streams: dict[str, LiveStream] = {}
        self._finished: OrderedDict[str, LiveStream] = OrderedDict()  # oldest first

    def open(self, response_id: str) -> LiveStream:
        self._drop(response_id)
        stream = self._streams[response_id] = LiveStream(self)
        return stream

    def get(self, response_id: str) -> LiveStream | None:
        return self._streams.get(response_id)

    def close(self, response_id: str) -> None:
        stream = self._streams.get(response_id)
        if stream is None or stream.closed:
            return
        stream.close()
        if stream.size > self.max_bytes_per_response:
            self._drop(response_id)
        else:
            self._finished[response_id] = stream
            asyncio.get_running_loop().call_later(self.ttl_s, self._expire, response_id, stream)
        while self.total_bytes > self.max_bytes and self._finished:
            self._drop(next(iter(self._finished)))

    def _expire(self, response_id: str, stream: LiveStream) -> None:
        if self._streams.get(response_id) is stream:
            self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        stream = self._streams.pop(response_id, None)
        self._finished.pop(response_id, None)
        if stream is not None:
            self.total_bytes -= stream.size


async def replay_events(
    service: Any, record: Any, *, poll_s: float = 0.5
) -> AsyncIterator[bytes]:
    """The events of a stored response rebuilt from its chain (one delta per content part, so
    sequence numbers are those of this replay). A response still running elsewhere is waited
    for, with keep-alive comments meanwhile."""
    while record.status in ("queued", "in_progress"):
        yield b": keep-alive\n\n"
        await asyncio.sleep(poll_s)
        record = await service.store.get_response(record.id)
        if record is None:
            return
    events: list[bytes] = []
    builder: ResponseBuilder = service.builder_for_record(record, emit=events.append)
    builder.start()
    await service.replay_chain(record.id, builder)
    builder.finish(
        record.status,
        error=record.error,
        incomplete_details=record.incomplete_details,
        completed_at=record.completed_at,
    )
    for event in events:
        yield event
