"""The event-log cache: bounded memory, staged events, followers that fall back to the store
(a real SQLite store; the writer that persists through it)."""

from __future__ import annotations

import asyncio
import sqlite3

import orjson

from gateway.engine.live import LiveStreams, follow_store
from gateway.engine.writer import ResponseWriter
from gateway.protocol.sse import encode_event
from store import open_store
from store.types import Fence, FencedError, ResponseRecord


def _event(sequence: int, kind: str = "response.output_text.delta") -> bytes:
    return encode_event({"type": kind, "sequence_number": sequence, "delta": "x" * 80})


async def _store(tmp_path, response_id: str = "resp_live"):
    store = open_store(str(tmp_path / "live.db"))
    await store.open()
    await store.create_response(
        ResponseRecord(id=response_id, model="m", request={"model": "m"}, created_at=1.0),
        owner="me", lease_s=60,
    )
    return store


def test_cache_stays_bounded_and_followers_read_the_rest_from_the_store(tmp_path):
    async def run() -> None:
        store = await _store(tmp_path)
        live = LiveStreams(max_bytes_per_response=2_000, max_bytes=10_000)
        log = live.open("resp_live")
        writer = ResponseWriter(store, "resp_live", Fence("me", 1), log, flush_s=0.001)
        events = [_event(i) for i in range(200)]
        for event in events:
            log.emit(event)
            if len(log.events) % 20 == 0:
                await writer.flush()
        await writer.flush()
        assert log.persisted == 200
        assert log.nbytes <= 2_000 and log.base > 0  # the front went to the store only
        assert live.nbytes == log.nbytes
        terminal = _event(200, "response.completed")
        log.hold()
        log.emit(terminal)
        assert log.end == 200  # staged: not visible until its write commits
        await writer.update_response("resp_live", status="completed")
        assert log.end == 201 and log.persisted == 201
        live.close("resp_live", stream=log)
        assert len(live) == 0 and live.nbytes == 0
        followed = [chunk async for chunk in log.follow(0, store)]
        assert b"".join(followed) == b"".join([*events, terminal])
        stored = [chunk async for chunk in follow_store(store, "resp_live", 99)]
        assert b"".join(stored) == b"".join([*events[100:], terminal])
        await writer.close()
        await store.close()

    asyncio.run(run())


def test_a_fenced_writer_writes_nothing(tmp_path):
    async def run() -> None:
        store = await _store(tmp_path)
        live = LiveStreams()
        log = live.open("resp_live")
        stale = ResponseWriter(store, "resp_live", Fence("me", 0), log)
        log.emit(_event(0))
        try:
            await stale.update_response("resp_live", status="completed")
        except FencedError:
            pass
        else:
            raise AssertionError("a stale fence was accepted")
        assert stale.fenced and log.persisted == 0
        record = await store.get_response("resp_live")
        assert record is not None and record.status == "in_progress"
        assert await store.list_events("resp_live") == []
        await stale.close()
        await store.close()

    asyncio.run(run())


def test_terminal_event_detection_matches_the_builder():
    from gateway.engine.live import is_terminal

    for kind in ("response.completed", "response.failed", "response.incomplete"):
        assert is_terminal(encode_event({"type": kind, "sequence_number": 3}))
    delta = encode_event({"type": "response.output_text.delta", "sequence_number": 1, "delta": "response.completed"})
    assert not is_terminal(delta) and orjson.loads(delta.split(b"data: ")[1])["sequence_number"] == 1


def test_the_total_cap_trims_every_log(tmp_path):
    async def run() -> None:
        store = await _store(tmp_path, "resp_a")
        await store.create_response(
            ResponseRecord(id="resp_b", model="m", request={"model": "m"}, created_at=1.0),
            owner="me", lease_s=60,
        )
        live = LiveStreams(max_bytes_per_response=100_000, max_bytes=5_000)
        writers = []
        for response_id in ("resp_a", "resp_b"):
            log = live.open(response_id)
            writer = ResponseWriter(store, response_id, Fence("me", 1), log)
            writers.append(writer)
            for i in range(40):
                log.emit(_event(i))
            await writer.flush()
        assert live.nbytes <= 5_000
        for writer in writers:
            await writer.close()
        await store.close()

    asyncio.run(run())


def test_stored_first_a_burst_first_event_goes_out_after_a_write_of_its_own(tmp_path):
    """With stored-first, the events emitted before the emitting task yields are stored by one
    write started at once; what the rest of the burst emits meanwhile queues behind that write
    and reaches followers only with the write that carries it (never before it is stored)."""

    async def run() -> None:
        store = await _store(tmp_path)
        live = LiveStreams(stored_first=True)
        log = live.open("resp_live")
        writer = ResponseWriter(store, "resp_live", Fence("me", 1), log)
        seen: list[tuple[int, int]] = []  # (sequence published, events stored by then)
        log.listeners.append(lambda event: seen.append((len(seen), log.end)))
        first = [_event(i) for i in range(3)]  # item added, part added, the first delta
        rest = [_event(i) for i in range(3, 12)]
        for event in first:
            log.emit(event)
        await asyncio.sleep(0)  # the model call's pause after its first delta
        for event in rest:
            log.emit(event)
        assert log.end == 0  # nothing published before it is stored
        terminal = _event(12, "response.completed")
        log.hold()
        log.emit(terminal)
        await writer.update_response("resp_live", status="completed")
        assert log.end == 13 and log.persisted == 13
        assert [end for _, end in seen[:3]] == [3, 3, 3]  # the first write carried only those
        stored = await store.list_events("resp_live")
        assert [event for _, event in stored] == [*first, *rest, terminal]
        await writer.close()
        await store.close()

    asyncio.run(run())


def test_stored_first_a_paced_stream_is_stored_in_writes_flush_s_apart(tmp_path):
    """A model streaming a delta every 2 ms for 0.1 s: the first goes out at once (a write of
    its own), the rest in writes at most ``flush_s`` apart (one stored row each), not one per
    delta; each event reaches followers only once stored, all of them in order, and the last
    ones without any further write to carry them."""

    async def run() -> None:
        store = await _store(tmp_path)
        live = LiveStreams(stored_first=True)
        log = live.open("resp_live")
        writer = ResponseWriter(store, "resp_live", Fence("me", 1), log, flush_s=0.02)
        reader = sqlite3.connect(tmp_path / "live.db")  # what another process would read
        stored_now = "SELECT coalesce(max(last_sequence_number), -1) FROM event_batches"
        published: list[tuple[bytes, int]] = []  # (event, last sequence stored at its publication)
        log.listeners.append(lambda event: published.append((event, reader.execute(stored_now).fetchone()[0])))
        events = [_event(i) for i in range(50)]
        for event in events:
            log.emit(event)
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.1)  # the last flush falls due without another write
        assert log.persisted == log.end == 50
        assert [event for event, _ in published] == events
        assert all(stored >= n for n, (_, stored) in enumerate(published))  # stored, then sent
        reader.close()
        assert [event for _, event in await store.list_events("resp_live")] == events
        rows = await store._run(  # one row per write (store.event_log)
            lambda conn: conn.execute("SELECT count(*) FROM event_batches").fetchone()[0]
        )
        # 0.1 s of deltas at most 0.02 s apart: the first write and about five more (one per
        # delta would be 50); a loaded machine only lengthens the gaps, so fewer, never more.
        assert 2 <= rows <= 9
        await writer.close()
        await store.close()

    asyncio.run(run())
