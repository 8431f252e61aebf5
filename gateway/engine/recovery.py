"""Liveness, leases and crash take-over: no response stays ``in_progress`` forever.

Every process that runs responses has an ``owner`` id, registered in the store for the
process's lifetime (``Store.register_owner``: an advisory lock on PostgreSQL, an ``flock`` beside
the SQLite file — the kernel or the database drops it however the process dies), and holds a
lease on each response it runs, renewed every ``lease_s / 3`` seconds. Every ``claim_s`` (1 s)
and at start-up, :class:`Recovery` claims the responses whose owner is dead (at once) or whose
lease ran out (a hung owner, after ``lease_s``) and resumes them from their chain and event log:
model calls and agent tools are re-run, HTTP tools only when registered ``idempotent``;
otherwise the interrupted step fails with ``interrupted`` and the loop goes on from there
(``gateway.engine.loop``). Each claim bumps the response's owner epoch, so the previous owner's
writes (fenced, ``gateway.engine.writer``) fail from then on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
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

    def __init__(
        self, service: ResponsesService, *, lease_s: float, claim_s: float = 1.0
    ) -> None:
        self.service = service
        self.lease_s = lease_s
        self.claim_s = min(claim_s, lease_s / 3)
        self.owner = service.owner or new_owner_id()
        self.registered_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._renewed = 0.0

    async def start(self) -> None:
        """Register this process's liveness, claim and resume dead owners' and stale
        responses now, then keep doing it in the background."""
        await self.service.store.register_owner(self.owner)
        self.registered_at = time.time()
        logger.info("owner %s registered", self.owner)
        await self.sweep()
        self._task = asyncio.create_task(self._run(), name="stepchain-recovery")

    async def sweep(self) -> int:
        """Renew our leases (every ``lease_s / 3``), then claim and resume every response of a
        dead owner or with a lapsed lease; returns how many were claimed."""
        store = self.service.store
        now = time.monotonic()
        if now - self._renewed >= self.lease_s / 3:
            await store.renew_leases(self.owner, self.lease_s)
            self._renewed = now
        claimed = await store.claim_responses(self.owner, self.lease_s)
        for record in claimed:
            self.service.resume_in_task(record)
        return len(claimed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.claim_s)
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
        store = self.service.store
        try:
            released = await store.release_leases(self.owner)
            await store.release_owner(self.owner)
        except StoreError as exc:
            logger.error("could not release leases: %s", exc)
            return
        if released:
            logger.warning("left %d unfinished response(s) for resumption", released)
