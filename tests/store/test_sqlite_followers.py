"""Followers on another process of one SQLite file (issue 11: "SQLite: a cheap poll or
file-change wake-up between processes of one host"): the store's poller notices other
connections' commits by ``PRAGMA data_version`` and wakes its followers at the next tick.

Two :class:`store.sqlite.SQLiteStore` objects on one file are two connections, as two
processes' stores are: ``data_version`` changes for each when the other commits. Found by
measuring a follower on a second ``stepchain serve`` (one SQLite file): a tenth of its events
came late, at the follower's 5 s fallback re-check instead of the 25 ms poll — each case below
was one way to miss a wake-up.
"""

from __future__ import annotations

import asyncio
import time

from store.sqlite import SQLiteStore
from store.types import ResponseRecord, new_id
from tests.store.helpers import run

POLL_S = 0.2  # the follower's tick; its fallback re-check is 5 s
WOKEN_S = 3.0  # a wake-up by the poll comes within a tick or two; the fallback's would not


def _record() -> ResponseRecord:
    return ResponseRecord(id=new_id("resp"), model="m", request={}, created_at=time.time())


def test_followers_on_another_connection_are_woken_at_the_next_tick(tmp_path) -> None:
    path = tmp_path / "shared.db"

    async def main() -> None:
        writer, follower = SQLiteStore(path), SQLiteStore(path, poll_s=POLL_S)
        await writer.open()
        await follower.open()
        try:
            record, other = _record(), _record()
            await writer.create_response(record)
            await writer.create_response(other)

            async def wait_then(after: int, commit) -> None:
                waiting = asyncio.ensure_future(follower.wait_events(record.id, after, 60))
                await asyncio.sleep(POLL_S / 4)  # it looked and found nothing; its poller sleeps
                assert not waiting.done()
                await commit()
                await asyncio.wait_for(waiting, WOKEN_S)

            # 1. A commit before a new poller's first look: it compares with the version seen
            #    at connect, not with that first look (which would take the commit in silently).
            await wait_then(-1, lambda: writer.append_events(record.id, 0, [b"e0"]))
            # 2. Woken by another response's commit, the follower finds nothing and re-arms: the
            #    poller must still be there for the commit it waits for.
            async def unrelated_then_awaited() -> None:
                await writer.append_events(other.id, 0, [b"x0"])
                await asyncio.sleep(2 * POLL_S)  # the poll wakes the follower; nothing for it
                await writer.append_events(record.id, 1, [b"e1"])

            await wait_then(0, unrelated_then_awaited)
            # 3. Nobody waits for a while: the poller stops; the next wait starts a new one,
            #    and a commit made before its first look is not lost either.
            await asyncio.sleep(1.0 + 3 * POLL_S)
            assert follower._poller is not None and follower._poller.done()
            await wait_then(1, lambda: writer.append_events(record.id, 2, [b"e2"]))
            assert await follower.list_events(record.id) == [(0, b"e0"), (1, b"e1"), (2, b"e2")]
        finally:
            await follower.close()
            await writer.close()

    run(main())
