"""One thread that runs blocking calls for the event loop, in batches.

``ThreadPoolExecutor`` wakes its thread for every call and hands every result back with its own
``call_soon_threadsafe``; on a busy gateway that is two cross-thread wake-ups per store call,
each costing far more than the SQLite work itself. This worker takes everything queued since its
last wake in one go, runs the calls in order, and returns all their results to the loop in one
callback: under load, many calls share one pair of wake-ups. Ordering is first come, first run.

Calls submitted with :meth:`BatchingWorker.submit_grouped` that end up next to each other in one
batch are handed to the ``group`` function together (the SQLite store runs them in one
transaction: one commit, one write of the pages they share, instead of one per call).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BatchingWorker"]

_T = TypeVar("_T")
_Item = tuple[
    asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...], bool
]
_Call = tuple[Callable[..., Any], tuple[Any, ...]]
#: ``group(calls)`` runs two or more calls together and returns one ``(ok, result or exception)``
#: per call, in order; or ``None`` when it could not, and nothing of theirs took effect (each call
#: then runs on its own).
GroupRunner = Callable[[list[_Call]], "list[tuple[bool, Any]] | None"]


class BatchingWorker:
    """A single worker thread; :meth:`submit` returns an asyncio future of the call's result.

    ``group`` (optional, see :data:`GroupRunner`) runs adjacent grouped calls together.
    """

    def __init__(self, name: str, group: GroupRunner | None = None) -> None:
        self._group = group
        # A C queue: put() wakes the worker only when it is waiting, with no Python-level
        # condition variable in between (the submitting side of every store call).
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submissions against shutdown's end marker
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Queue ``fn(*args)``; raises RuntimeError once :meth:`shutdown` was called."""
        return self._submit(fn, args, False)

    def submit_grouped(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Like :meth:`submit`, but ``fn(*args)`` may run together with adjacent grouped calls
        (through ``group``); its result is only delivered once the whole group succeeded."""
        return self._submit(fn, args, self._group is not None)

    def _submit(self, fn: Callable[..., _T], args: tuple[Any, ...], grouped: bool) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            self._queue.put((loop, future, fn, args, grouped))
        return future

    def shutdown(self) -> None:
        """Run what is queued, then stop the thread (blocks until it has stopped)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)  # the end marker: nothing is queued after it
        self._thread.join()

    def _work(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stop = False
        while not stop:
            first = get()  # blocks (without the GIL) until something is queued
            batch: list[_Item] = []
            item = first
            while True:
                if item is None:
                    stop = True  # run what came before the end marker, then return
                    break
                batch.append(item)
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if not batch:
                continue
            done: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
            for items, results in self._run(batch):
                for (loop, future, *_rest), (ok, value) in zip(items, results, strict=True):
                    done.setdefault(loop, []).append((future, ok, value))
            for loop, outcomes in done.items():
                try:
                    loop.call_soon_threadsafe(_deliver, outcomes)
                except RuntimeError:
                    pass  # that loop is closed: nobody is waiting any more

    def _run(self, batch: list[_Item]) -> list[tuple[list[_Item], list[tuple[bool, Any]]]]:
        """Run a batch in order: runs of two or more adjacent grouped calls through ``group``,
        everything else (and any group that could not run) one call at a time."""
        out: list[tuple[list[_Item], list[tuple[bool, Any]]]] = []
        i, n = 0, len(batch)
        while i < n:
            j = i + 1
            if batch[i][4]:
                while j < n and batch[j][4]:
                    j += 1
            items = batch[i:j]
            results = None
            if len(items) > 1 and self._group is not None:
                try:
                    results = self._group([(item[2], item[3]) for item in items])
                except BaseException as exc:  # a broken group runner: fail its calls, run none twice
                    results = [(False, exc)] * len(items)
            if results is None:
                results = [_call(item[2], item[3]) for item in items]
            out.append((items, results))
            i = j
        return out


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    try:
        return True, fn(*args)
    except BaseException as exc:  # handed to the awaiting coroutine
        return False, exc


def _deliver(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
