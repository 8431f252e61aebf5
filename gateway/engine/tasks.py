"""The background tasks a gateway process owns: responses that outlive their HTTP request.

A streamed or background response runs in a task of its own, so it finishes and is stored even if
its client leaves; on shutdown :meth:`TaskSet.drain` gives the tasks a grace period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from gateway.errors import UpstreamError, to_gateway_error

logger = logging.getLogger("stepchain")

__all__ = ["TaskSet"]


class TaskSet:
    """Background tasks the app owns (streamed responses keep running if the client leaves)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            error = to_gateway_error(exc)
            # A client's error or an upstream's failure is someone's answer, not our failure.
            if error.status_code >= 500 and not isinstance(error, UpstreamError):
                logger.error("background task failed", exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` seconds for the tasks, then cancel the rest."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
