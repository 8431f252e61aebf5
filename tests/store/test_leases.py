"""Response leases: who runs a response, and taking over from a dead owner."""

from __future__ import annotations

import asyncio
import time

from store.sqlite import SQLiteStore
from store.types import ResponseRecord


def _record(rid: str, status: str = "in_progress") -> ResponseRecord:
    return ResponseRecord(id=rid, model="m", request={}, status=status, created_at=time.time())


def test_claim_renew_release(tmp_path):
    async def main():
        a = SQLiteStore(tmp_path / "s.db")
        b = SQLiteStore(tmp_path / "s.db")  # a second process on the same file
        await a.open()
        await b.open()
        try:
            await a.create_response(_record("resp_live"), owner="A", lease_s=60)
            await a.create_response(_record("resp_dying"), owner="A", lease_s=0.05)
            await a.create_response(_record("resp_done", "completed"), owner="A", lease_s=0.05)
            await a.create_response(_record("resp_unleased"))
            await asyncio.sleep(0.1)
            claimed = {r.id for r in await b.claim_responses("B", 60)}
            assert claimed == {"resp_dying", "resp_unleased"}
            assert await b.claim_responses("C", 60) == []  # nothing twice
            assert await a.renew_leases("A", 60) == 1  # only resp_live is still A's
            assert await b.release_leases("B") == 2
            again = {r.id for r in await a.claim_responses("A", 60)}
            assert again == {"resp_dying", "resp_unleased"}
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
