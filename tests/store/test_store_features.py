"""The durable event log, follower wake-ups, cancellation, conversations, listing and retention,
on both backends (``store``/``make_store`` are parametrised sqlite/postgres)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import Store
from store.types import (
    MODEL_CALL,
    StoreConflictError,
    ConversationRecord,
    StoreNotFoundError,
    ResponseRecord,
    StepDescriptor,
    StepStateError,
    new_id,
)
from tests.store.helpers import run

MakeStore = Callable[[], Store]
MODEL = StepDescriptor(MODEL_CALL, {"model": "m", "messages": []})


def _record(**kw: object) -> ResponseRecord:
    kw.setdefault("created_at", time.time())
    return ResponseRecord(id=new_id("resp"), model="m", request={"input": "hi"}, **kw)  # type: ignore[arg-type]


def _frame(n: int, text: str) -> bytes:
    return (
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\","
        + f'"sequence_number":{n},"delta":{text!r}'.encode()
        + b"}\n\n"
    )


# -- the durable event log ---------------------------------------------------------------------


def test_events_round_trip_byte_exact(store: Store) -> None:
    async def main() -> None:
        record = _record()
        odd = [b"", b"\x00\xff\xfe not utf-8 \x80", "é ✓ 🙂".encode(), _frame(3, "x") * 50]
        (step,) = await store.create_response(
            record, owner="A", lease_s=60, first_steps=[MODEL], events=(0, [_frame(0, "a")])
        )
        await store.record_attempt(step.id, None, "u1", events=(1, [_frame(1, "b")]))
        await store.complete_step(step.id, {"ok": True}, events=(2, odd[:2]))
        (nxt,) = await store.record_steps(record.id, None, step.id, [MODEL], events=(4, odd[2:]))
        await store.mark_processing(nxt.id, events=(6, []))  # nothing to append
        await store.append_events(record.id, 6, [b"six", b"seven"])
        await store.update_response(record.id, status="completed", events=(8, [b"[DONE]"]))
        expected = [_frame(0, "a"), _frame(1, "b"), *odd, b"six", b"seven", b"[DONE]"]
        got = await store.list_events(record.id)
        assert got == list(enumerate(expected))
        assert all(type(data) is bytes for _, data in got)
        assert await store.list_events(record.id, after=4) == list(enumerate(expected))[5:]
        assert await store.list_events(record.id, after=1, limit=2) == [(2, odd[0]), (3, odd[1])]
        assert await store.list_events(record.id, after=8) == []
        assert await store.list_events("resp_unknown") == []
        # Deleting the response deletes its log.
        assert await store.delete_response(record.id)
        assert await store.list_events(record.id) == []

    run(main())


def test_events_ride_their_write_transaction(store: Store) -> None:
    async def main() -> None:
        record = _record()
        (step,) = await store.create_response(record, first_steps=[MODEL], events=(0, [b"e0"]))
        # A taken sequence number: neither the step transition nor any event is written.
        with pytest.raises(StoreConflictError):
            await store.complete_step(step.id, {"ok": 1}, events=(0, [b"dup", b"e1"]), response_update={"status": "completed"})  # noqa: E501
        with pytest.raises(StoreConflictError):
            await store.complete_step(step.id, {"ok": 1}, events=(0, [b"again"]))
        stored = await store.get_step(step.id)
        assert stored is not None and stored.state == "processing"
        assert await store.list_events(record.id) == [(0, b"e0")]
        assert (await store.get_response(record.id)).status == "in_progress"  # type: ignore[union-attr]
        # An illegal transition writes its events neither.
        with pytest.raises(StepStateError):
            await store.mark_processing(step.id, events=(1, [b"e1"]))
        assert await store.list_events(record.id) == [(0, b"e0")]
        with pytest.raises(StoreNotFoundError):
            await store.append_events("resp_unknown", 0, [b"x"])
        with pytest.raises(ValueError):
            await store.append_events(record.id, -1, [b"x"])
        with pytest.raises(ValueError):
            await store.append_events(record.id, 1, ["text"])  # type: ignore[list-item]

    run(main())


def test_any_batches_of_events_come_back_exactly(store: Store) -> None:
    """Any bytes in any batches come back exactly (one new response per hypothesis example)."""

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.lists(st.binary(max_size=300), max_size=4), max_size=6))
    def check(batches: list[list[bytes]]) -> None:
        async def main() -> None:
            record = _record()
            await store.create_response(record)
            n = 0
            for batch in batches:
                await store.append_events(record.id, n, batch)
                n += len(batch)
            flat = [e for batch in batches for e in batch]
            assert await store.list_events(record.id) == list(enumerate(flat))

        run(main())

    check()


def test_wait_events_wakes_a_follower_on_another_store(make_store: MakeStore) -> None:
    writer, follower = make_store(), make_store()  # two connections, as two replicas

    async def main() -> None:
        await writer.open()
        await follower.open()
        record = _record()
        await writer.create_response(record, events=(0, [b"e0"]))
        # Already there: returns at once.
        await asyncio.wait_for(follower.wait_events(record.id, -1, 30), 30)
        waiting = asyncio.ensure_future(follower.wait_events(record.id, 0, 60))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await writer.append_events(record.id, 1, [b"e1"])
        await asyncio.wait_for(waiting, 30)
        assert await follower.list_events(record.id, after=0) == [(1, b"e1")]
        # A finished response wakes followers too (nothing more will come).
        waiting = asyncio.ensure_future(follower.wait_events(record.id, 1, 60))
        await asyncio.sleep(0.1)
        await writer.update_response(record.id, status="completed")
        await asyncio.wait_for(waiting, 30)
        # Nothing new and not finished: returns after the timeout, no error.
        other = _record()
        await writer.create_response(other)
        await follower.wait_events(other.id, -1, 0.05)
        assert await follower.list_events(other.id) == []

    run(main())


# -- cancellation ------------------------------------------------------------------------------


def test_cancel_requested_from_another_store_reaches_the_owner(make_store: MakeStore) -> None:
    owner, other = make_store(), make_store()

    async def main() -> None:
        await owner.open()
        await other.open()
        record = _record()
        await owner.create_response(record, owner="A", lease_s=60)
        assert await owner.wait_cancel(record.id, timeout_s=0.05) is False
        watching = asyncio.ensure_future(owner.wait_cancel(record.id))
        await asyncio.sleep(0.1)
        assert not watching.done()
        assert await other.request_cancel(record.id) is True
        assert await asyncio.wait_for(watching, 30) is True
        assert await owner.wait_cancel(record.id, timeout_s=0) is True  # already requested
        stored = await owner.get_response(record.id)
        assert stored is not None and stored.cancel_requested
        assert await other.request_cancel("resp_unknown") is False
        assert await owner.wait_cancel("resp_unknown", timeout_s=0.05) is False
        # A watcher the owner stops is simply cancelled.
        stopped = asyncio.ensure_future(owner.wait_cancel(_record().id))
        await asyncio.sleep(0.05)
        stopped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopped

    run(main())


# -- conversations -----------------------------------------------------------------------------


def _item(n: int) -> dict[str, object]:
    return {"type": "message", "id": f"msg_{n:03d}", "role": "user",
            "content": [{"type": "input_text", "text": f"turn {n}"}], "status": "completed"}  # fmt: skip


def test_conversation_items_page_in_both_orders(store: Store) -> None:
    async def main() -> None:
        conv = ConversationRecord(id="conv_1", tenant="acme", created_at=123.5, metadata={"topic": "x"})
        await store.create_conversation(conv, [_item(0), _item(1)])
        await store.add_conversation_items("conv_1", [_item(n) for n in range(2, 7)])
        assert await store.get_conversation("conv_1") == conv
        assert await store.get_conversation("conv_missing") is None

        page, more = await store.list_conversation_items("conv_1", limit=3)
        assert [i["id"] for i in page] == ["msg_006", "msg_005", "msg_004"] and more
        page, more = await store.list_conversation_items("conv_1", after="msg_004", limit=3)
        assert [i["id"] for i in page] == ["msg_003", "msg_002", "msg_001"] and more
        page, more = await store.list_conversation_items("conv_1", after="msg_001", limit=3)
        assert [i["id"] for i in page] == ["msg_000"] and not more
        page, more = await store.list_conversation_items("conv_1", order="asc", limit=4)
        assert [i["id"] for i in page] == ["msg_000", "msg_001", "msg_002", "msg_003"] and more
        page, more = await store.list_conversation_items("conv_1", order="asc", after="msg_003")
        assert [i["id"] for i in page] == ["msg_004", "msg_005", "msg_006"] and not more
        assert page[0] == _item(4)  # stored as given

        assert await store.get_conversation_item("conv_1", "msg_002") == _item(2)
        assert await store.get_conversation_item("conv_1", "msg_999") is None
        assert await store.delete_conversation_item("conv_1", "msg_002") is True
        assert await store.delete_conversation_item("conv_1", "msg_002") is False
        page, _ = await store.list_conversation_items("conv_1", order="asc", limit=100)
        assert [i["id"] for i in page] == [f"msg_{n:03d}" for n in (0, 1, 3, 4, 5, 6)]

        updated = await store.update_conversation("conv_1", {"topic": "y", "k": "v"})
        assert updated.metadata == {"topic": "y", "k": "v"} and updated.created_at == 123.5

        with pytest.raises(StoreConflictError):
            await store.create_conversation(ConversationRecord(id="conv_1"))
        with pytest.raises(StoreConflictError):
            await store.add_conversation_items("conv_1", [_item(7), _item(3)])
        page, _ = await store.list_conversation_items("conv_1", limit=100)
        assert len(page) == 6  # the failed batch added nothing, not even msg_007
        for bad in ([{"type": "message"}], [_item(8), _item(8)]):
            with pytest.raises(ValueError):
                await store.add_conversation_items("conv_1", bad)
        for call in (
            store.add_conversation_items("conv_missing", [_item(9)]),
            store.list_conversation_items("conv_missing"),
            store.list_conversation_items("conv_1", after="msg_999"),
            store.update_conversation("conv_missing", {}),
        ):
            with pytest.raises(StoreNotFoundError):
                await call
        with pytest.raises(ValueError):
            await store.list_conversation_items("conv_1", limit=0)
        with pytest.raises(ValueError):
            await store.list_conversation_items("conv_1", order="sideways")

        assert await store.delete_conversation("conv_1") is True
        assert await store.delete_conversation("conv_1") is False
        assert await store.get_conversation_item("conv_1", "msg_000") is None

    run(main())


def test_conversation_items_ride_the_last_write(store: Store) -> None:
    async def main() -> None:
        await store.create_conversation(ConversationRecord(id="conv_t", created_at=1.0))
        record = _record()
        (step,) = await store.create_response(record, first_steps=[MODEL])
        # An unknown conversation: the step is not completed, the response not updated.
        with pytest.raises(StoreNotFoundError):
            await store.complete_step(
                step.id, {"ok": 1}, response_update={"status": "completed"},
                conversation_items=("conv_missing", [_item(1)]),
            )  # fmt: skip
        assert (await store.get_step(step.id)).state == "processing"  # type: ignore[union-attr]
        await store.complete_step(
            step.id, {"ok": 1}, response_update={"status": "completed"},
            conversation_items=("conv_t", [_item(1), _item(2)]),
        )  # fmt: skip
        await store.update_response(record.id, conversation_items=("conv_t", [_item(3)]))
        page, more = await store.list_conversation_items("conv_t", order="asc")
        assert [i["id"] for i in page] == ["msg_001", "msg_002", "msg_003"] and not more

    run(main())


# -- listing and retention ---------------------------------------------------------------------


def test_list_responses_page(store: Store) -> None:
    async def main() -> None:
        made = []
        for n in range(7):
            r = _record(created_at=1000.0 + n, tenant="acme" if n % 2 else "other",
                        status="completed" if n < 5 else "in_progress")  # fmt: skip
            r.model = "big" if n % 3 == 0 else "small"
            made.append(r)
            await store.create_response(r)
        await store.create_response(_record(created_at=1003.0))  # no tenant, same second as #3
        acme = [r.id for r in reversed(made) if r.tenant == "acme"]
        page, more = await store.list_responses_page(tenant="acme", limit=2)
        assert [r.id for r in page] == acme[:2] and more
        page, more = await store.list_responses_page(tenant="acme", after=page[-1].id, limit=2)
        assert [r.id for r in page] == acme[2:] and not more
        everyone, more = await store.list_responses_page(all_tenants=True, limit=100)
        assert len(everyone) == 8 and not more
        assert [r.created_at for r in everyone] == sorted((r.created_at for r in everyone), reverse=True)
        untenanted, _ = await store.list_responses_page()
        assert len(untenanted) == 1 and untenanted[0].tenant is None
        done, _ = await store.list_responses_page(all_tenants=True, status="completed", model="big")
        assert [r.id for r in done] == [made[3].id, made[0].id]
        found, _ = await store.list_responses_page(all_tenants=True, search=made[4].id[-10:])
        assert [r.id for r in found] == [made[4].id]
        with pytest.raises(StoreNotFoundError):
            await store.list_responses_page(after="resp_missing")
        with pytest.raises(ValueError):
            await store.list_responses_page(limit=0)

    run(main())


def test_purge_before_deletes_old_finished_responses_only(store: Store) -> None:
    async def main() -> None:
        old_done = _record(created_at=100.0, status="completed")
        old_running = _record(created_at=100.0, status="in_progress")
        new_done = _record(created_at=10_000.0, status="failed")
        for r in (old_done, old_running, new_done):
            await store.create_response(r, first_steps=[MODEL], events=(0, [b"e"]))
        await store.create_conversation(ConversationRecord(id="conv_keep", created_at=1.0))
        assert await store.purge_before(5000.0) == 1
        assert await store.get_response(old_done.id) is None
        assert await store.list_steps(old_done.id) == []
        assert await store.list_events(old_done.id) == []
        for kept in (old_running, new_done):
            assert await store.get_response(kept.id) is not None
            assert len(await store.list_steps(kept.id)) == 1
            assert await store.list_events(kept.id) == [(0, b"e")]
        assert await store.get_conversation("conv_keep") is not None
        assert await store.purge_before(5000.0) == 0

    run(main())


# -- keys holding NUL ----------------------------------------------------------------------------


def test_a_key_holding_nul_names_nothing(store: Store) -> None:
    """PostgreSQL text cannot hold U+0000: such a key finds, changes and deletes nothing (as an
    unknown key on SQLite), and is never an outage."""
    nul = "resp_\x00"

    async def main() -> None:
        record = _record()
        await store.create_response(record)
        await store.create_conversation(ConversationRecord(id="conv_n"), [_item(0)])
        assert await store.get_response(nul) is None
        assert await store.delete_response(nul) is False
        assert await store.list_steps(nul) == []
        assert await store.list_events(nul) == []
        with pytest.raises(StoreNotFoundError):  # not record's (a C string ends at the NUL)
            await store.append_events(record.id + "\x00", 0, [b"x"])
        assert await store.list_events(record.id) == []
        assert await store.request_cancel(nul) is False
        assert await store.get_tool("\x00") is None
        assert await store.delete_tool("\x00") is False
        assert await store.get_conversation("conv_\x00") is None
        assert await store.delete_conversation("conv_\x00") is False
        assert await store.get_conversation_item("conv_n", "msg_\x00") is None
        assert await store.delete_conversation_item("conv_n", "msg_\x00") is False
        with pytest.raises(StoreNotFoundError):
            await store.list_conversation_items("conv_n", after="msg_\x00")
        with pytest.raises(StoreNotFoundError):
            await store.list_conversation_items("conv_\x00")
        with pytest.raises(StoreNotFoundError):
            await store.update_conversation("conv_\x00", {})
        page, _ = await store.list_responses_page(model="m\x00")
        assert page == []
        assert (await store.get_response(record.id)).request == record.request  # type: ignore[union-attr]

    run(main())
