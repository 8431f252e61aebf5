"""One thread that runs blocking calls for the event loop, in batches.

``ThreadPoolExecutor`` wakes its thread for every call and hands every result back with its own
``call_soon_threadsafe``; on a busy gateway that is two cross-thread wake-ups per store call,
each costing far more than the SQLite work itself. This worker takes everything queued since its
last wake in one go, runs the calls in order, and returns all their results to the loop in one
callback: under load, many calls share one pair of wake-ups. Each call is still its own
transaction; ordering is first come, first run.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BatchingWorker"]

_T = TypeVar("_T")
_Item = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class BatchingWorker:
    """A single worker thread; :meth:`submit` returns an asyncio future of the call's result."""

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Queue ``fn(*args)``; raises RuntimeError once :meth:`shutdown` was called."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            self._queue.append((loop, future, fn, args))
            if len(self._queue) == 1:  # the worker may be waiting: it only waits on an empty queue
                self._cond.notify()
        return future

    def shutdown(self) -> None:
        """Run what is queued, then stop the thread (blocks until it has stopped)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            done: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
            for loop, future, fn, args in batch:
                try:
                    outcome = (future, True, fn(*args))
                except BaseException as exc:  # handed to the awaiting coroutine
                    outcome = (future, False, exc)
                done.setdefault(loop, []).append(outcome)
            for loop, outcomes in done.items():
                try:
                    loop.call_soon_threadsafe(_deliver, outcomes)
                except RuntimeError:
                    pass  # that loop is closed: nobody is waiting any more


def _deliver(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
