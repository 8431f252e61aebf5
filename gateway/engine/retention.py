"""Retention: finished responses older than ``retention_days`` are deleted periodically.

:func:`purge_periodically` calls the store's ``purge_before(timestamp) -> int`` (responses
finished and created before ``timestamp``, with their steps and events) once at start-up and then
every ``interval_s`` seconds, on every replica (the store makes concurrent purges harmless). A
store without ``purge_before`` is reported once and left alone. Store errors are logged, never
raised: the next round tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from store.types import StoreError

__all__ = ["purge_interval", "purge_periodically"]

logger = logging.getLogger("stepchain.retention")


def purge_interval(retention_days: float) -> float:
    """Seconds between purges: a 24th of the retention period, between 1 s and one hour."""
    return min(3600.0, max(1.0, retention_days * 86_400 / 24))


async def purge_periodically(store: Any, retention_days: float, *, interval_s: float | None = None) -> None:
    """Run until cancelled: delete what is older than ``retention_days`` (days), every
    ``interval_s`` seconds (default :func:`purge_interval`)."""
    purge = getattr(store, "purge_before", None)
    if purge is None:
        logger.warning("retention_days is set, but this store cannot purge: nothing is deleted")
        return
    interval = interval_s if interval_s is not None else purge_interval(retention_days)
    while True:
        try:
            removed = await purge(time.time() - retention_days * 86_400)
            if removed:
                logger.info("retention: deleted %d responses older than %g days", removed, retention_days)
        except StoreError as exc:
            logger.warning("retention: purge failed: %s", exc)
        await asyncio.sleep(interval)
