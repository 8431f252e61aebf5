"""Leases and crash recovery: no response stays ``in_progress`` forever.

Every process that runs responses has an ``owner`` id and holds a lease on each response it
runs, renewed every ``lease_s / 3`` seconds. A response whose lease runs out — its process was
killed, or shut down and gave its leases up — is claimed by any live process sharing the store
(at start-up and then periodically) and resumed from its chain: model calls and agent tools are
re-run, HTTP tools only when registered ``idempotent``; otherwise the interrupted step fails with
``interrupted`` and the loop goes on from there (``gateway.engine.loop``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from store.types import StoreError, new_id

if TYPE_CHECKING:
    from .service import ResponsesService

logger = logging.getLogger("stepchain.recovery")

__all__ = ["Recovery", "new_owner_id"]


def new_owner_id() -> str:
    """A process id unique across hosts and restarts: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('owner')[-8:]}"


class Recovery:
    """Renews this process's leases and resumes responses whose owner is gone."""

    def __init__(self, service: ResponsesService, *, lease_s: float) -> None:
        self.service = service
        self.lease_s = lease_s
        self.owner = service.owner or new_owner_id()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Claim and resume stale responses now, then keep doing it in the background."""
        await self.sweep()
        self._task = asyncio.create_task(self._run(), name="stepchain-recovery")

    async def sweep(self) -> int:
        """Renew our leases, then claim and resume every stale response; returns how many."""
        store = self.service.store
        await store.renew_leases(self.owner, self.lease_s)
        claimed = await store.claim_responses(self.owner, self.lease_s)
        for record in claimed:
            self.service.spawn(record.id, self.service.resume(record))
        return len(claimed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.sweep()
            except Exception:  # keep trying, whatever it was: the store may come back
                logger.exception("lease renewal or recovery sweep failed; trying again")

    async def stop(self) -> None:
        """Stop renewing, and give up the leases of responses still unfinished (after the
        shutdown grace period) so another process resumes them at once."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            released = await self.service.store.release_leases(self.owner)
        except StoreError as exc:
            logger.error("could not release leases: %s", exc)
            return
        if released:
            logger.warning("left %d unfinished response(s) for resumption", released)
