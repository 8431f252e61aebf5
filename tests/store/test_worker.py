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


def _grouping_worker(groups: list[list[int]], *, give_up: bool = False) -> BatchingWorker:
    """A worker whose group runner records the group sizes (and optionally refuses to run)."""

    def group(calls):
        groups.append([args[0] for _fn, args in calls])
        if give_up:
            return None
        return [(True, fn(*args)) for fn, args in calls]

    return BatchingWorker("test-worker", group=group)


def _hold(worker: BatchingWorker) -> threading.Event:
    """Block the worker thread until the returned event is set, so submissions pile up."""
    release = threading.Event()
    started = threading.Event()

    def wait() -> None:
        started.set()
        release.wait(10)

    worker._submit(wait, (), False)
    started.wait(10)
    return release


def test_adjacent_grouped_calls_run_as_one_group_in_order():
    async def main():
        groups: list[list[int]] = []
        worker = _grouping_worker(groups)
        ran: list[int] = []

        def record(i: int) -> int:
            ran.append(i)
            return i

        try:
            release = _hold(worker)
            futures = [worker.submit_grouped(record, i) for i in range(5)]
            futures.append(worker.submit(record, 5))  # not grouped: runs on its own
            futures += [worker.submit_grouped(record, i) for i in (6, 7)]
            release.set()
            results = await asyncio.gather(*futures)
        finally:
            await asyncio.to_thread(worker.shutdown)
        return results, ran, groups

    results, ran, groups = asyncio.run(main())
    assert results == list(range(8)) and ran == list(range(8))
    assert groups == [[0, 1, 2, 3, 4], [6, 7]]


def test_a_group_that_cannot_run_falls_back_to_one_call_at_a_time():
    async def main():
        groups: list[list[int]] = []
        worker = _grouping_worker(groups, give_up=True)
        ran: list[int] = []
        try:
            release = _hold(worker)
            futures = [worker.submit_grouped(lambda i: ran.append(i) or i, i) for i in range(3)]
            release.set()
            results = await asyncio.gather(*futures)
        finally:
            await asyncio.to_thread(worker.shutdown)
        return results, ran, groups

    results, ran, groups = asyncio.run(main())
    assert groups == [[0, 1, 2]]  # offered as a group, refused
    assert results == [0, 1, 2] and ran == [0, 1, 2]  # then each ran exactly once


def test_a_broken_group_runner_fails_its_calls_without_running_them_twice():
    async def main():
        def group(calls):
            raise RuntimeError("group runner bug")

        worker = BatchingWorker("test-worker", group=group)
        ran: list[int] = []
        try:
            release = _hold(worker)
            futures = [worker.submit_grouped(ran.append, i) for i in range(2)]
            release.set()
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await asyncio.to_thread(worker.shutdown)
        return outcomes, ran

    outcomes, ran = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) for o in outcomes) and ran == []
