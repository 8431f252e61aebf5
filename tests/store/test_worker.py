"""The batching worker: order kept, errors handed back, results delivered, clean shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from store.worker import BatchingWorker


def test_calls_run_in_order_on_one_thread_off_the_loop():
    async def main():
        worker = BatchingWorker("test-worker")
        seen: list[tuple[int, int]] = []

        def record(i: int) -> int:
            seen.append((i, threading.get_ident()))
            return i * 2

        try:
            results = await asyncio.gather(*(worker.submit(record, i) for i in range(200)))
        finally:
            await asyncio.to_thread(worker.shutdown)
        return results, seen, threading.get_ident()

    results, seen, loop_thread = asyncio.run(main())
    assert results == [i * 2 for i in range(200)]
    assert [i for i, _ in seen] == list(range(200))
    assert len({t for _, t in seen}) == 1 and seen[0][1] != loop_thread


def test_errors_reach_the_caller_and_later_calls_still_run():
    async def main():
        worker = BatchingWorker("test-worker")

        def boom() -> None:
            raise ValueError("nope")

        try:
            with pytest.raises(ValueError, match="nope"):
                await worker.submit(boom)
            return await worker.submit(lambda: "after")
        finally:
            await asyncio.to_thread(worker.shutdown)

    assert asyncio.run(main()) == "after"


def test_shutdown_runs_what_is_queued_then_refuses_more():
    async def main():
        worker = BatchingWorker("test-worker")
        future = worker.submit(lambda: "queued")
        await asyncio.to_thread(worker.shutdown)
        with pytest.raises(RuntimeError):
            worker.submit(lambda: None)
        return await future

    assert asyncio.run(main()) == "queued"
