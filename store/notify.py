"""In-process wake-ups for store waiters: the fan-out behind ``wait_events`` and ``wait_cancel``.

A backend feeds :meth:`Waiters.notify` from whatever tells it that something changed (PostgreSQL:
``LISTEN``; SQLite: its own commits, plus a poll for other processes), and :func:`wait_until`
re-checks the database after each wake-up, so a lost or spurious notification costs at most one
poll interval or one extra query, never a wrong answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

__all__ = ["Waiters", "wait_until"]


class Waiters:
    """Futures keyed by ``(channel, key)`` (e.g. ``("events", response_id)``), woken together.

    Loop-bound: use from the event loop's thread only (a backend's listener task runs there).
    """

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], set[asyncio.Future[None]]] = {}

    @contextmanager
    def watch(self, channel: str, key: str) -> Iterator[Callable[[], asyncio.Future[None]]]:
        """Register interest; yields ``arm()`` returning a fresh future for the next wake-up."""
        slot = (channel, key)
        current: list[asyncio.Future[None]] = []

        def arm() -> asyncio.Future[None]:
            futures = self._by_key.setdefault(slot, set())
            for old in current:
                futures.discard(old)
            current[:] = [asyncio.get_running_loop().create_future()]
            futures.add(current[0])
            return current[0]

        try:
            yield arm
        finally:
            futures = self._by_key.get(slot)
            if futures is not None:
                for old in current:
                    futures.discard(old)
                if not futures:
                    del self._by_key[slot]

    def notify(self, channel: str, key: str) -> None:
        """Wake everyone waiting on ``(channel, key)``."""
        for future in self._by_key.pop((channel, key), ()):
            if not future.done():
                future.set_result(None)

    def notify_channel(self, channel: str) -> None:
        """Wake everyone waiting on any key of ``channel``."""
        for key in self.keys(channel):
            self.notify(channel, key)

    def wake_all(self) -> None:
        """Wake every waiter (after notifications may have been missed)."""
        slots, self._by_key = self._by_key, {}
        for futures in slots.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    def keys(self, channel: str) -> list[str]:
        """The keys someone waits on in ``channel``."""
        return [key for (ch, key) in self._by_key if ch == channel]

    def __bool__(self) -> bool:
        return bool(self._by_key)


async def wait_until(
    waiters: Waiters,
    channel: str,
    key: str,
    ready: Callable[[], Awaitable[bool]],
    timeout_s: float | None,
    poll_s: Callable[[], float | None],
) -> bool:
    """Return True as soon as ``ready()`` is true (checked first, then after every wake-up and
    every ``poll_s()`` seconds when that is not None), or False after ``timeout_s`` (None: no
    limit). Registration precedes each check, so a notification between the two is not lost."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + max(0.0, timeout_s)
    with waiters.watch(channel, key) as arm:
        while True:
            future = arm()
            if await ready():
                return True
            poll = poll_s()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            wait = remaining if poll is None else (poll if remaining is None else min(poll, remaining))
            await asyncio.wait({future}, timeout=wait)
