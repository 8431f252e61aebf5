"""Event logs of streamed responses: the durable log in the store, and a bounded cache of it.

Every event a client can see of a streamed or background response is stored byte-identical
(type, payload and ``sequence_number``; event *i* of a response has sequence number *i*) in the
store's event log (``Store.append_events`` and the ``events=`` argument of every write, see
:mod:`gateway.engine.writer`). So ``GET /v1/responses/{id}?stream=true&starting_after=N`` on any
replica, after a restart, at any time while the response is stored, gives exactly the events
after N, then the live ones, then ``[DONE]``.

A :class:`LiveStream` is this process's cache of one running response's log: the owner appends
each event as the builder encodes it (followers in this process get it at once), the writer
persists the pending ones with the next store write or after ``flush_s``. Its memory is
bounded: persisted events beyond ``max_bytes`` per response, or beyond the total of
:class:`LiveStreams`, are dropped from the front (followers that need them read the store), and
a log leaves the cache as soon as its response ends. Followers on other replicas (or of a
response no longer cached here) read the store and wait with ``Store.wait_events``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from gateway.protocol.events import ResponseBuilder
from gateway.protocol.sse import encode_event
from store.types import StoreUnavailableError

from .store_retry import retry_unavailable

__all__ = [
    "LiveStream", "LiveStreams", "ends_stream", "follow_store", "is_terminal", "replay_events",
]

_TERMINAL = (
    b"event: response.completed\n",
    b"event: response.failed\n",
    b"event: response.incomplete\n",
    b"event: response.cancelled\n",
)
_KEEP_ALIVE = b": keep-alive\n\n"
_UNFINISHED = ("queued", "in_progress")
_T = TypeVar("_T")


def is_terminal(event: bytes) -> bool:
    """Whether an encoded event ends its response's stream."""
    return event.startswith(_TERMINAL)


def ends_stream(chunk: bytes) -> bool:
    """Whether the last of the encoded events joined in ``chunk`` ends its response's stream
    (an event's JSON is one line, so events are split by ``\n\nevent: ``)."""
    last = chunk.rfind(b"\n\nevent: ")
    return chunk.startswith(_TERMINAL, last + 2 if last >= 0 else 0)


class LiveStream:
    """The encoded SSE events of one response run by this process, in sequence order.

    ``events[i]`` has sequence number ``base + i``; ``end`` is the next sequence number. Events
    below ``persisted`` are in the store. Events emitted while :meth:`hold` is on are *staged*:
    published (visible to followers) only when the store write that carries them commits.

    With ``stored_first`` every event is staged: nothing reaches a client before the store has
    it, so a client that re-attaches anywhere after this process died gets exactly the events it
    missed (a take-over re-runs the interrupted model call and writes *its* events after the
    stored ones). Events staged outside a hold are *flushable* — the writer stores them at once,
    one write in flight, so bursts share a write — while held ones wait for their step's write.
    """

    __slots__ = (
        "response_id", "events", "base", "persisted", "closed", "handed_over", "staged",
        "holding", "nbytes", "accounted", "on_pending", "listeners", "_changed", "_owner",
        "stored_first", "flushable",
    )  # fmt: skip

    def __init__(
        self, response_id: str = "", *, owner: LiveStreams | None = None, stored_first: bool = False
    ) -> None:
        self.response_id = response_id
        self.events: list[bytes] = []
        self.base = 0
        self.persisted = 0
        self.closed = False
        # Closed because another process took the response over: followers go on from the store.
        self.handed_over = False
        self.staged: list[bytes] = []
        self.holding = False
        self.nbytes = 0
        self.accounted = 0  # the bytes of it the LiveStreams total counts
        # Called (once per burst) when unpersisted events appear: the writer schedules a flush.
        self.on_pending: Callable[[], None] | None = None
        # Called with each event as it is published (a WebSocket connection's sender).
        self.listeners: list[Callable[[bytes], None]] = []
        self._changed = asyncio.Event()
        self._owner = owner
        self.stored_first = stored_first
        self.flushable = 0  # staged[:flushable] may be stored without waiting for a step write

    @property
    def end(self) -> int:
        """The sequence number the next published event gets."""
        return self.base + len(self.events)

    # -- the owner's side ----------------------------------------------------------------------

    def emit(self, event: bytes) -> None:
        """Append one encoded event (the ResponseBuilder's ``emit``)."""
        if self.holding or self.stored_first:
            staged = self.staged
            staged.append(event)
            if not self.holding:
                self.flushable = flushable = len(staged)
                if flushable == 1 and self.on_pending is not None:
                    self.on_pending()
            return
        self.events.append(event)
        self.nbytes += len(event)
        self._changed.set()
        for listener in self.listeners:
            listener(event)
        if self.on_pending is not None and self.end - self.persisted == 1:
            self.on_pending()

    def hold(self) -> None:
        """Stage the events emitted from now on until the next write that carries them."""
        self.holding = True

    def pending(self) -> tuple[int, list[bytes]] | None:
        """``(first sequence, events)`` not yet in the store (published ones, then staged)."""
        unpersisted = self.events[self.persisted - self.base :] if self.persisted < self.end else []
        if not unpersisted and not self.staged:
            return None
        return self.persisted, unpersisted + self.staged

    def flushable_pending(self) -> tuple[int, list[bytes]] | None:
        """``(first sequence, events)`` a flush may store now: published but unpersisted events,
        then the flushable staged ones (never events held for a step write)."""
        unpersisted = self.events[self.persisted - self.base :] if self.persisted < self.end else []
        if not self.holding:
            extra = self.staged
        elif self.stored_first:
            extra = self.staged[: self.flushable]
        else:
            return None
        if not unpersisted and not extra:
            return None
        return self.persisted, unpersisted + extra

    def committed(self, first: int, count: int) -> None:
        """The store has the ``count`` events from ``first`` on: publish the staged ones."""
        if first != self.persisted:
            return
        published = self.end - self.persisted
        if count > published:  # the batch carried staged events: publish them now
            staged = self.staged[: count - published]
            del self.staged[: count - published]
            self.flushable = max(0, self.flushable - len(staged))
            self.events.extend(staged)
            self.nbytes += sum(map(len, staged))
            if self.listeners:
                for event in staged:
                    for listener in self.listeners:
                        listener(event)
            if not self.staged:
                self.holding = False
            self._changed.set()
        self.persisted = first + count
        if self._owner is not None:
            self._owner.trim(self)

    def drop_staged(self) -> None:
        """Forget staged events (their write failed) and stop holding."""
        self.staged.clear()
        self.flushable = 0
        self.holding = False

    def trim(self, keep_bytes: int) -> int:
        """Drop persisted events from the front until at most ``keep_bytes`` remain cached;
        returns the bytes freed."""
        freed = 0
        while self.nbytes > keep_bytes and self.base < self.persisted and self.events:
            freed += len(self.events[0])
            self.nbytes -= len(self.events[0])
            del self.events[0]
            self.base += 1
        return freed

    def close(self, *, handed_over: bool = False) -> None:
        self.closed = True
        self.handed_over = handed_over
        self._changed.set()

    # -- followers ------------------------------------------------------------------------------

    async def wait_for(self, count: int) -> None:
        """Until the log holds ``count`` events (published) or is closed."""
        while self.end < count and not self.closed:
            self._changed.clear()
            await self._changed.wait()

    def event_at(self, sequence: int) -> bytes | None:
        """The cached event with this sequence number, or None."""
        i = sequence - self.base
        return self.events[i] if 0 <= i < len(self.events) else None

    async def follow(
        self, start: int = 0, store: Any = None, *, outage_s: float = 300.0
    ) -> AsyncIterator[bytes]:
        """Yield events from sequence number ``start`` on, as they come, until the log closes
        (then, if the response was handed over to another process, on from the store).

        Events already waiting are joined into one chunk: one write instead of many. Events
        dropped from the cache are read from ``store``, waiting out an outage of up to
        ``outage_s`` seconds (then StoreUnavailableError ends the stream).
        """
        i = start
        while True:
            if i < self.base and store is not None:
                after, limit = i - 1, self.base - i
                rows = await retry_unavailable(
                    lambda: store.list_events(self.response_id, after=after, limit=limit),
                    until=asyncio.get_running_loop().time() + outage_s,
                )
                chunk = []
                for sequence, event in rows:
                    if sequence != i:
                        break
                    chunk.append(event)
                    i += 1
                if chunk:
                    yield b"".join(chunk)
                    continue
                i = max(i, self.base)  # not in the store either (cannot happen): go on
            n = self.end
            if i < n:
                events = self.events
                lo, hi = i - self.base, n - self.base
                yield events[lo] if hi - lo == 1 else b"".join(events[lo:hi])
                i = n
                continue
            if self.closed:
                if self.handed_over and store is not None:
                    async for chunk in follow_store(store, self.response_id, i - 1):
                        yield chunk
                return
            self._changed.clear()
            await self._changed.wait()


class LiveStreams:
    """The cached logs of this process, by response id: at most ``max_bytes_per_response`` of
    persisted events per response and ``max_bytes`` in all; a log leaves as it closes."""

    def __init__(
        self, *, max_bytes_per_response: int = 1 << 20, max_bytes: int = 64 << 20, stored_first: bool = False
    ) -> None:
        self.stored_first = stored_first  # see LiveStream
        self.max_bytes_per_response = max_bytes_per_response
        self.max_bytes = max_bytes
        self._streams: dict[str, LiveStream] = {}
        self._total = 0  # bytes cached, as of each log's last store write

    def open(self, response_id: str) -> LiveStream:
        stream = LiveStream(response_id, owner=self, stored_first=self.stored_first)
        self._streams[response_id] = stream
        return stream

    def get(self, response_id: str) -> LiveStream | None:
        return self._streams.get(response_id)

    def close(
        self, response_id: str, *, stream: LiveStream | None = None, handed_over: bool = False
    ) -> None:
        """Close the log (``stream``, or the cached one) and drop it from the cache unless a
        newer log of the response replaced it there (its followers keep their reference)."""
        cached = self._streams.get(response_id)
        if stream is None:
            stream = cached
        if stream is None:
            return
        if cached is stream:
            del self._streams[response_id]
            self._total -= stream.accounted
            stream.accounted = 0
        if not stream.closed:
            stream.close(handed_over=handed_over)

    @property
    def nbytes(self) -> int:
        """The bytes cached, as of each log's last store write."""
        return self._total

    total_bytes = nbytes

    def _account(self, stream: LiveStream) -> None:
        if self._streams.get(stream.response_id) is stream:
            self._total += stream.nbytes - stream.accounted
            stream.accounted = stream.nbytes

    def trim(self, stream: LiveStream) -> None:
        """After ``stream`` persisted more: keep it, and the whole cache, within the caps
        (dropping only events the store has)."""
        if stream.nbytes > self.max_bytes_per_response:
            stream.trim(self.max_bytes_per_response // 2)
        self._account(stream)
        if self._total > self.max_bytes:
            for other in sorted(self._streams.values(), key=lambda s: -s.nbytes):
                other.trim(0)
                self._account(other)
                if self._total <= self.max_bytes // 2:
                    break

    def __len__(self) -> int:
        return len(self._streams)


async def follow_store(
    store: Any, response_id: str, after: int, *, keep_alive_s: float = 15.0,
    outage_s: float = 300.0,
) -> AsyncIterator[bytes]:
    """The stored events of a response with sequence number > ``after``, then the new ones as
    they are stored (``Store.wait_events``), until the terminal event; a keep-alive comment
    every ``keep_alive_s`` seconds without events. Ends without a terminal event only when the
    response ends (or is deleted) with none stored (e.g. it was not streamed).

    While the store is unavailable the follower keeps its client with keep-alive comments and
    retries with backoff (:func:`~gateway.engine.store_retry.retry_unavailable`), then goes on
    from the last event it yielded, none lost or repeated. After ``outage_s`` seconds without
    an answer it ends with an ``error`` event (code ``store_unavailable``) whose
    ``sequence_number`` is that of the last event yielded (``after`` if none): the
    ``starting_after`` to resume with. It is not stored; ``[DONE]`` follows as usual.
    """
    loop = asyncio.get_running_loop()
    cursor = after
    answered = loop.time()  # when the store last answered
    while True:
        try:
            events, state = await retry_unavailable(
                functools.partial(_look, store, response_id, cursor, keep_alive_s),
                until=min(loop.time() + keep_alive_s, answered + outage_s),
            )
        except StoreUnavailableError:
            if loop.time() < answered + outage_s:
                yield _KEEP_ALIVE
                continue
            yield _gave_up(cursor, outage_s)
            return
        answered = loop.time()
        if events:
            cursor += len(events)
            yield b"".join(events)
        if state == _ENDED or (events and is_terminal(events[-1])):
            return
        if state == _IDLE:
            yield _KEEP_ALIVE


_MORE, _IDLE, _ENDED = "more", "idle", "ended"


async def _look(
    store: Any, response_id: str, cursor: int, wait_s: float
) -> tuple[list[bytes], str]:
    """One look at the store for the events after sequence number ``cursor`` (reads only, so
    it may be tried again): ``(events, "more")``, those stored in sequence (up to a terminal
    one); or, when there are none, after waiting up to ``wait_s`` for some, ``([], "more")``
    if some came, ``([], "idle")`` if none came and the response is unfinished, ``([],
    "ended")`` if it ended (or is gone) with none."""
    rows = await store.list_events(response_id, after=cursor)
    events = []
    for sequence, event in rows:
        if sequence != cursor + 1 + len(events):
            break  # a gap (a later batch committed first): wait for the missing ones
        events.append(event)
        if is_terminal(event):
            break
    if events:
        return events, _MORE
    await store.wait_events(response_id, cursor, wait_s)
    if await store.list_events(response_id, after=cursor, limit=1):
        return events, _MORE
    record = await store.get_response(response_id)
    if record is None or record.status not in _UNFINISHED:
        if await store.list_events(response_id, after=cursor, limit=1):
            return events, _MORE  # its last events committed with its status
        return events, _ENDED
    return events, _IDLE


def _gave_up(cursor: int, outage_s: float) -> bytes:
    """The ``error`` event that ends a follower the store left without an answer."""
    return encode_event({
        "type": "error", "sequence_number": cursor, "code": "store_unavailable",
        "message": f"The response store did not answer for {outage_s:g} s; resume with "
        f"starting_after={cursor}.",
        "param": None,
    })  # fmt: skip


async def stored_events(
    service: Any, record: Any, starting_after: int, *, outage_s: float = 300.0
) -> AsyncIterator[bytes]:
    """A stored response's events after ``starting_after``, from the durable log (then live
    ones, from any replica); a response that has no log (not streamed, or stored before the
    log existed) is rebuilt from its chain once it has ended. Its reads of the store wait out
    an outage of up to ``outage_s`` (see :func:`follow_store`)."""
    store = service.store
    loop = asyncio.get_running_loop()

    def patiently(read: Callable[[], Awaitable[_T]]) -> Awaitable[_T]:
        return retry_unavailable(read, until=loop.time() + outage_s)

    has_log = bool(await patiently(lambda: store.list_events(record.id, limit=1)))
    if has_log or record.status in _UNFINISHED:
        seen = False
        async for chunk in follow_store(store, record.id, starting_after, outage_s=outage_s):
            seen = seen or not chunk.startswith(b":")
            yield chunk
        if seen or has_log or await patiently(lambda: store.list_events(record.id, limit=1)):
            return
        record = await patiently(lambda: store.get_response(record.id))
        if record is None:
            return
    try:  # the chain is read here, patiently like every read above, not inside the replay
        steps = await patiently(lambda: store.list_steps(record.id))
    except StoreUnavailableError:
        yield _gave_up(starting_after, outage_s)
        return
    index = 0
    async for event in replay_events(service, record, steps):
        if index > starting_after:
            yield event
        index += 1


async def replay_events(
    service: Any, record: Any, steps: Sequence[Any] | None = None
) -> AsyncIterator[bytes]:
    """The events of a finished response without a stored log, rebuilt from its chain
    (``steps``, read from the store when None; one delta per content part, so sequence
    numbers are those of this replay)."""
    events: list[bytes] = []
    builder: ResponseBuilder = service.builder_for_record(record, emit=events.append)
    builder.start()
    await service.replay_chain(record.id, builder, steps)
    builder.finish(
        record.status,
        error=record.error,
        incomplete_details=record.incomplete_details,
        completed_at=record.completed_at,
    )
    for event in events:
        yield event
