"""Waiting out a store outage: one call retried with backoff while the database is unreachable.

The response writer (:mod:`gateway.engine.writer`) retries every write and read this way, and
stream followers (:func:`gateway.engine.live.follow_store`) their reads: a
``StoreUnavailableError`` means nothing of the call was done, so trying it again is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from store.types import StoreUnavailableError

__all__ = ["retry_unavailable"]

_T = TypeVar("_T")
FIRST_DELAY_S = 0.05


async def retry_unavailable(
    call: Callable[[], Awaitable[_T]],
    *,
    max_delay_s: float = 2.0,
    until: float | None = None,
    on_wait: Callable[[StoreUnavailableError], None] | None = None,
) -> _T:
    """``call()``; while it raises StoreUnavailableError, again after 50 ms, 100 ms, … (doubling,
    at most ``max_delay_s`` apart). ``on_wait(exc)`` is called at the first such failure.

    With ``until`` (a time of the running loop's clock, ``loop.time()``), the last
    StoreUnavailableError is raised instead of waiting past it. Any other exception is raised
    at once.
    """
    loop = asyncio.get_running_loop()
    delay = FIRST_DELAY_S
    waited = False
    while True:
        try:
            return await call()
        except StoreUnavailableError as exc:
            if until is not None and loop.time() + delay > until:
                raise
            if not waited and on_wait is not None:
                on_wait(exc)
            waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
