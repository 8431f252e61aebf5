"""Who runs a response: leases, owner liveness (take-over at once from a dead owner, also one
killed with SIGKILL in another process), and fencing (a stale owner writes nothing), on both
backends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from store import Store
from store.types import (
    MODEL_CALL,
    StoreConflictError,
    Fence,
    FencedError,
    StoreNotFoundError,
    ResponseRecord,
    StepDescriptor,
)
from tests.store.helpers import run

MakeStore = Callable[[], Store]
REPO = Path(__file__).resolve().parents[2]


def _record(rid: str, status: str = "in_progress") -> ResponseRecord:
    return ResponseRecord(id=rid, model="m", request={}, status=status, created_at=time.time())


def _opened(make_store: MakeStore) -> Store:
    s = make_store()
    run(s.open())
    return s


def test_claim_renew_release(make_store: MakeStore) -> None:
    a, b = _opened(make_store), _opened(make_store)  # b: a second process on the same database

    async def main() -> None:
        await a.create_response(_record("resp_live"), owner="A", lease_s=60)
        await a.create_response(_record("resp_dying"), owner="A", lease_s=0.05)
        await a.create_response(_record("resp_done", "completed"), owner="A", lease_s=0.05)
        await a.create_response(_record("resp_unleased"))
        await asyncio.sleep(0.1)
        claimed = await b.claim_responses("B", 60)
        assert {r.id for r in claimed} == {"resp_dying", "resp_unleased"}
        assert all(r.owner == "B" and r.owner_epoch == 2 for r in claimed)
        assert await b.claim_responses("C", 60) == []  # nothing twice
        assert await a.renew_leases("A", 60) == 1  # only resp_live is still A's
        assert await b.release_leases("B") == 2
        again = await a.claim_responses("A", 60)
        assert {r.id for r in again} == {"resp_dying", "resp_unleased"}
        assert {r.owner_epoch for r in again} == {3}
        stored = await b.get_response("resp_dying")
        assert stored is not None and stored.fence == Fence("A", 3)

    run(main())


def test_concurrent_claimers_never_share_a_response(make_store: MakeStore) -> None:
    stores = [_opened(make_store) for _ in range(3)]

    async def main() -> None:
        for i in range(30):
            await stores[0].create_response(_record(f"resp_{i:02d}"))
        results = await asyncio.gather(
            *(s.claim_responses(f"P{n}", 60, limit=12) for n, s in enumerate(stores))
        )
        ids = [r.id for batch in results for r in batch]
        assert len(ids) == len(set(ids)) == 30

    run(main())


def test_a_registered_dead_owner_is_taken_over_at_once(make_store: MakeStore) -> None:
    a, b = _opened(make_store), _opened(make_store)

    async def main() -> None:
        await a.register_owner("proc-A")
        await a.register_owner("proc-A")  # idempotent
        with pytest.raises(StoreConflictError):
            await b.register_owner("proc-A")  # alive elsewhere
        await a.create_response(_record("resp_a"), owner="proc-A", lease_s=600)
        await a.create_response(_record("resp_unregistered"), owner="proc-X", lease_s=600)
        assert await b.claim_responses("proc-B", 60) == []  # A is alive, X's lease holds
        await a.release_owner("proc-A")  # A is gone (its lease still has ten minutes)
        await a.release_owner("proc-A")  # idempotent
        claimed = await b.claim_responses("proc-B", 60)
        # An owner that never registered (proc-X) is judged by its lease alone.
        assert [(r.id, r.owner, r.owner_epoch) for r in claimed] == [("resp_a", "proc-B", 2)]
        await b.register_owner("proc-A")  # the name is free again

    run(main())


_HOLDER = textwrap.dedent(
    """
    import asyncio, sys, time
    from store import open_store
    from store.types import ResponseRecord

    async def main():
        store = open_store(sys.argv[1])
        await store.open()
        await store.register_owner("proc-doomed")
        record = ResponseRecord(id="resp_doomed", model="m", request={}, created_at=time.time())
        await store.create_response(record, owner="proc-doomed", lease_s=600)
        print("ready", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_sigkilled_owner_in_another_process_is_taken_over_at_once(
    store_url: str, make_store: MakeStore
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, store_url],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        b = _opened(make_store)
        assert run(b.claim_responses("proc-B", 60)) == []  # alive: its lease runs ten minutes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

        async def take_over() -> list[ResponseRecord]:
            # The database notices the dead client's connection close within moments; poll
            # until then (bounded), never waiting for the 600 s lease.
            deadline = time.monotonic() + 30
            while True:
                claimed = await b.claim_responses("proc-B", 60)
                if claimed or time.monotonic() > deadline:
                    return claimed
                await asyncio.sleep(0.05)

        claimed = run(take_over())
        assert [(r.id, r.owner, r.owner_epoch) for r in claimed] == [("resp_doomed", "proc-B", 2)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_stale_fence_writes_nothing(make_store: MakeStore) -> None:
    a, b = _opened(make_store), _opened(make_store)
    model = StepDescriptor(MODEL_CALL, {"model": "m", "messages": []})

    async def main() -> None:
        await a.create_response(_record("resp_f"), owner="A", lease_s=600)
        old = Fence("A", 1)
        (s1,) = await a.record_steps("resp_f", None, None, [model], fence=old)
        s2, s3, s4 = await a.record_steps(
            "resp_f", None, s1.id, [model, model, model], fence=old, events=(0, [b"e0", b"e1"])
        )
        await a.mark_processing(s2.id, fence=old)
        await a.release_leases("A")
        (claimed,) = await b.claim_responses("B", 600)
        new = claimed.fence
        assert new == Fence("B", 2)

        steps_before = await a.list_steps("resp_f")
        response_before = await a.get_response("resp_f")
        writes = [
            a.record_steps("resp_f", None, s4.id, [model], fence=old),
            a.mark_processing(s1.id, fence=old),
            a.complete_step(s2.id, {"x": 1}, fence=old, response_update={"status": "completed"}),
            a.fail_step(s2.id, {"type": "t", "message": "m"}, fence=old),
            a.cancel_step(s3.id, fence=old),
            a.record_attempt(s2.id, {"type": "t", "message": "m"}, "u", fence=old),
            a.update_response("resp_f", status="failed", fence=old),
            a.append_events("resp_f", 2, [b"late"], fence=old),
            a.update_response("resp_f", fence=Fence("B", 1)),  # right owner, old epoch
        ]
        for write in writes:
            with pytest.raises(FencedError):
                await write
        assert await a.list_steps("resp_f") == steps_before
        assert await a.get_response("resp_f") == response_before
        assert await a.list_events("resp_f") == [(0, b"e0"), (1, b"e1")]

        # The new owner's writes go through.
        await b.complete_step(s2.id, {"x": 2}, fence=new, events=(2, [b"e2"]))
        await b.update_response("resp_f", status="completed", fence=new)
        assert (await b.get_response("resp_f")).status == "completed"  # type: ignore[union-attr]
        assert [n for n, _ in await b.list_events("resp_f")] == [0, 1, 2]
        with pytest.raises(StoreNotFoundError):
            await b.mark_processing("step_missing", fence=new)
        with pytest.raises(StoreNotFoundError):
            await b.update_response("resp_missing", fence=new)

    run(main())
