"""Test helpers: ``run`` runs a coroutine on the test's one event loop (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_runner: list[asyncio.Runner] = []


@contextlib.contextmanager
def loop_runner() -> Iterator[asyncio.Runner]:
    """One event loop for the block; ``run`` uses it."""
    with asyncio.Runner() as runner:
        _runner.append(runner)
        try:
            yield runner
        finally:
            _runner.remove(runner)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on the current test's loop (a fresh loop outside a test)."""
    if _runner:
        return _runner[-1].run(coro)
    return asyncio.run(coro)
