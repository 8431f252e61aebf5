"""The store on both backends (``store`` is parametrised sqlite/postgres): responses, step chains,
the state machine, tools. SQLite-only details (pragmas, the worker thread, group commit) are
marked as such and use an SQLiteStore directly."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.sqlite import SQLiteStore
from store import Store
from store import postgres_ops, sqlite_ops
from store.types import (
    ALLOWED_TRANSITIONS,
    CANCELED,
    COMPLETED,
    FAILED,
    MODEL_CALL,
    PENDING,
    PROCESSING,
    STEP_STATES,
    TOOL_CALL,
    StoreConflictError,
    Fence,
    FencedError,
    StoreNotFoundError,
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreError,
    new_id,
)
from tests.store.helpers import run

MakeStore = Callable[[], Store]

# The transition each store method requests.
TARGETS = (PROCESSING, COMPLETED, FAILED, CANCELED)
ILLEGAL = [
    pytest.param(src, dst, id=f"{src}->{dst}")
    for src in STEP_STATES
    for dst in TARGETS
    if dst not in ALLOWED_TRANSITIONS[src]
]
# A way to reach each state from pending.
PATHS = {
    PENDING: (),
    PROCESSING: (PROCESSING,),
    COMPLETED: (PROCESSING, COMPLETED),
    FAILED: (PROCESSING, FAILED),
    CANCELED: (CANCELED,),
}


def reachable_states() -> set[str]:
    seen, todo = {PENDING}, [PENDING]
    while todo:
        for nxt in ALLOWED_TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


async def transition(store: Store, step_id: str, target: str) -> Step:
    if target == PROCESSING:
        return await store.mark_processing(step_id)
    if target == COMPLETED:
        return await store.complete_step(step_id, {"object": "chat.completion"})
    if target == FAILED:
        return await store.fail_step(step_id, {"type": "upstream_error", "message": "boom"})
    return await store.cancel_step(step_id)


def model_call(n: int = 0) -> StepDescriptor:
    return StepDescriptor(MODEL_CALL, {"model": "m", "messages": [{"role": "user", "content": n}]})


def tool_call(call_id: str) -> StepDescriptor:
    return StepDescriptor(TOOL_CALL, {"name": "add", "call_id": call_id, "arguments": "{}"})


def new_response(**kw: Any) -> ResponseRecord:
    kw.setdefault("created_at", 1000.0)
    return ResponseRecord(id=new_id("resp"), model="m", request={"input": "hi"}, **kw)


async def response_with_steps(store: Store, n: int = 1) -> tuple[str, list[Step]]:
    response = new_response()
    await store.create_response(response)
    steps = await store.record_steps(response.id, None, None, [model_call(i) for i in range(n)])
    return response.id, steps


def open_new(make_store: MakeStore) -> Store:
    store = make_store()
    run(store.open())
    return store


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "store.db")
    run(s.open())
    yield s
    run(s.close())


# -- lifecycle and connection ------------------------------------------------------------------


def test_pragmas(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "p.db", synchronous="full")

    async def go() -> tuple[Any, ...]:
        await store.open()
        await store.open()  # idempotent
        try:
            return await store._run(
                lambda conn: tuple(
                    conn.execute(f"PRAGMA {p}").fetchone()[0]
                    for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
                )
            )
        finally:
            await store.close()
            await store.close()  # idempotent

    assert run(go()) == ("wal", 2, 5000, 1)


@pytest.mark.parametrize("ops", [sqlite_ops, postgres_ops], ids=["sqlite", "postgres"])
def test_column_order_matches_the_dataclasses(ops: Any) -> None:
    assert ops.STEP_COLUMNS == tuple(f.name for f in dataclasses.fields(Step))
    assert ops.RESPONSE_COLUMNS == tuple(f.name for f in dataclasses.fields(ResponseRecord))


def test_bad_synchronous_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "x.db", synchronous="SOMETIMES")


def test_calls_outside_open_raise_store_error(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(StoreError, match="not open"):
        run(store.get_response("resp_x"))
    run(store.open())
    run(store.close())
    with pytest.raises(StoreError, match="not open"):
        run(store.list_tools())


def test_open_failure_is_a_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)  # a directory, not a database file
    with pytest.raises(StoreError):
        run(store.open())
    with pytest.raises(StoreError, match="not open"):
        run(store.list_tools())


def test_sqlite_runs_only_on_the_worker_thread(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    threads: list[int] = []

    async def go() -> int:
        await store._run(
            lambda conn: conn.set_trace_callback(lambda _sql: threads.append(threading.get_ident()))
        )
        response_id, (step,) = await response_with_steps(store)
        await store.update_response(response_id, status="completed")
        await store.mark_processing(step.id)
        await store.record_attempt(step.id, {"type": "timeout", "message": "t"}, "u1")
        await store.complete_step(step.id, {"ok": True})
        await store.list_chain(response_id)
        await store.list_unfinished_steps()
        await store.create_tool({"name": "t"})
        await store.delete_response(response_id)
        await store._run(lambda conn: conn.set_trace_callback(None))
        return threading.get_ident()

    loop_thread = run(go())
    assert threads and loop_thread not in threads
    assert len(set(threads)) == 1
    # The connection refuses every thread but its own worker.
    with pytest.raises(sqlite3.ProgrammingError):
        store._conn.execute("SELECT 1")  # type: ignore[union-attr]


def test_data_survives_close_and_reopen(make_store: MakeStore) -> None:
    store = open_new(make_store)
    response_id, steps = run(response_with_steps(store, 2))
    run(store.mark_processing(steps[0].id))
    run(store.create_tool({"name": "weather", "url": "http://127.0.0.1:1/"}))
    run(store.close())

    store = open_new(make_store)
    try:
        assert run(store.get_response(response_id)) is not None
        assert [s.state for s in run(store.list_steps(response_id))] == [PROCESSING, PENDING]
        assert run(store.get_tool("weather")) == {"name": "weather", "url": "http://127.0.0.1:1/"}
        more = run(store.record_steps(response_id, None, steps[1].id, [model_call()]))
        assert more[0].sequence == 3
    finally:
        run(store.close())


# -- responses ---------------------------------------------------------------------------------


def test_response_round_trip(store: Store) -> None:
    response = ResponseRecord(
        id="resp_1",
        model="gpt-x",
        request={"input": [{"role": "user", "content": "hi"}], "stream": True},
        tenant="acme",
        status="queued",
        previous_response_id="resp_0",
        created_at=1700000000.25,
        output=[{"type": "message", "content": []}],
        usage={"input_tokens": 1},
        error=None,
        incomplete_details=None,
        metadata={"k": "v"},
        store=False,
    )
    run(store.create_response(response, owner="proc-A", lease_s=30))
    stored = dataclasses.replace(response, owner="proc-A", owner_epoch=1)
    assert run(store.get_response("resp_1")) == stored
    assert stored.fence == Fence("proc-A", 1)
    assert run(store.get_response("resp_missing")) is None
    with pytest.raises(StoreConflictError):
        run(store.create_response(response))


def test_update_response(store: Store) -> None:
    response = new_response()
    run(store.create_response(response))
    run(
        store.update_response(
            response.id,
            status="incomplete",
            output=[{"type": "message", "id": "msg_1"}],
            usage={"total_tokens": 7},
            incomplete_details={"reason": "max_iterations_exceeded"},
            completed_at=1001.5,
            metadata={"a": "b"},
        )
    )
    got = run(store.get_response(response.id))
    assert got is not None
    assert (got.status, got.output, got.usage, got.completed_at, got.metadata) == (
        "incomplete",
        [{"type": "message", "id": "msg_1"}],
        {"total_tokens": 7},
        1001.5,
        {"a": "b"},
    )
    assert got.incomplete_details == {"reason": "max_iterations_exceeded"}
    run(store.update_response(response.id, error={"code": "x", "message": "y"}, usage=None))
    got = run(store.get_response(response.id))
    assert got is not None and got.error == {"code": "x", "message": "y"} and got.usage is None
    run(store.update_response(response.id))  # nothing to set, but it exists


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"model": "other"}, id="model"),
        pytest.param({"request": {}}, id="request"),
        pytest.param({"status": "completed", "tenant": "t"}, id="mixed"),
    ],
)
def test_update_response_rejects_other_fields(store: Store, fields: dict[str, Any]) -> None:
    response = new_response()
    run(store.create_response(response))
    before = run(store.get_response(response.id))
    with pytest.raises(ValueError):
        run(store.update_response(response.id, **fields))
    assert run(store.get_response(response.id)) == before


@pytest.mark.parametrize("fields", [{"status": "failed"}, {}], ids=["status", "nothing"])
def test_update_unknown_response(store: Store, fields: dict[str, Any]) -> None:
    with pytest.raises(StoreNotFoundError):
        run(store.update_response("resp_missing", **fields))


def test_delete_response_removes_its_steps(store: Store) -> None:
    response_id, steps = run(response_with_steps(store, 3))
    other_id, other_steps = run(response_with_steps(store, 1))
    assert run(store.delete_response(response_id)) is True
    assert run(store.get_response(response_id)) is None
    assert run(store.list_steps(response_id)) == []
    assert all(run(store.get_step(s.id)) is None for s in steps)
    assert run(store.delete_response(response_id)) is False
    assert run(store.list_steps(other_id)) == other_steps


def test_list_responses_by_status_oldest_first(store: Store) -> None:
    made = [
        new_response(status=status, created_at=created)
        for status, created in [
            ("in_progress", 30.0),
            ("completed", 10.0),
            ("queued", 20.0),
            ("in_progress", 5.0),
        ]
    ]
    for r in made:
        run(store.create_response(r))
    got = run(store.list_responses(["queued", "in_progress"]))
    assert [r.id for r in got] == [made[3].id, made[2].id, made[0].id]
    assert run(store.list_responses([])) == []


# -- recording steps ---------------------------------------------------------------------------


def test_record_steps_chains_parallel_siblings(store: Store) -> None:
    response_id, (first,) = run(response_with_steps(store, 1))
    assert (first.sequence, first.prev_step_id, first.state) == (1, None, PENDING)
    tools = run(
        store.record_steps(response_id, None, first.id, [tool_call(f"call_{i}") for i in range(3)])
    )
    assert [t.prev_step_id for t in tools] == [first.id, tools[0].id, tools[1].id]
    assert [t.request_payload["call_id"] for t in tools] == ["call_0", "call_1", "call_2"]
    nxt = run(store.record_steps(response_id, None, tools[-1].id, [model_call(), model_call()]))
    chain = run(store.list_chain(response_id))
    assert chain == [first, *tools, *nxt]
    assert [s.sequence for s in chain] == [1, 2, 3, 4, 5, 6]
    assert all(s.kind == TOOL_CALL for s in tools) and all(s.attempt == 0 for s in chain)
    assert len({s.id for s in chain}) == 6


def test_record_steps_unknown_response(store: Store) -> None:
    with pytest.raises(StoreNotFoundError):
        run(store.record_steps("resp_missing", None, None, [model_call()]))


def test_record_steps_rejects_unknown_kind(store: Store) -> None:
    response_id, _ = run(response_with_steps(store, 0))
    with pytest.raises(ValueError):
        run(store.record_steps(response_id, None, None, [StepDescriptor("web_search", {})]))


def test_unserialisable_payload_writes_nothing(store: Store) -> None:
    response_id, _ = run(response_with_steps(store, 0))
    bad = StepDescriptor(MODEL_CALL, {"x": object()})
    with pytest.raises(StoreError):
        run(store.record_steps(response_id, None, None, [model_call(), bad]))
    assert run(store.list_steps(response_id)) == []


def test_concurrent_record_steps_keep_sequences_gap_free(store: Store) -> None:
    async def go() -> list[Step]:
        response = new_response()
        await store.create_response(response)
        batches = [[tool_call(f"c{i}_{j}") for j in range(i % 3 + 1)] for i in range(50)]
        await asyncio.gather(*(store.record_steps(response.id, None, None, b) for b in batches))
        return await store.list_steps(response.id)

    steps = run(go())
    assert [s.sequence for s in steps] == list(range(1, len(steps) + 1))
    assert len(steps) == sum(i % 3 + 1 for i in range(50))


def test_two_stores_on_one_database_keep_sequences_unique(make_store: MakeStore) -> None:
    a, b = open_new(make_store), open_new(make_store)

    async def go() -> list[Step]:
        response = new_response()
        await a.create_response(response)
        calls = [(s, model_call(i)) for i in range(20) for s in (a, b)]
        await asyncio.gather(*(s.record_steps(response.id, None, None, [d]) for s, d in calls))
        return await b.list_steps(response.id)

    try:
        steps = run(go())
    finally:
        run(a.close())
        run(b.close())
    assert [s.sequence for s in steps] == list(range(1, 41))


# -- the state machine -------------------------------------------------------------------------


def test_mark_processing_then_complete(store: Store) -> None:
    response_id, (step,) = run(response_with_steps(store))
    started = run(store.mark_processing(step.id))
    assert (started.state, started.attempt) == (PROCESSING, 1)
    assert started.started_at is not None and started.started_at >= step.created_at
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    payload = {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}
    done = run(store.complete_step(step.id, payload, usage))
    assert (done.state, done.response_payload, done.usage) == (COMPLETED, payload, usage)
    assert done.finished_at is not None and done.finished_at >= started.started_at
    assert done.finished
    assert run(store.get_step(step.id)) == done


@pytest.mark.parametrize("start", [PENDING, PROCESSING])
def test_fail_keeps_partial_payload(store: Store, start: str) -> None:
    response_id, (step,) = run(response_with_steps(store))
    for target in PATHS[start]:
        run(transition(store, step.id, target))
    error = {"type": "upstream_error", "message": "connection reset"}
    partial = {"choices": [{"message": {"content": "half an ans"}}]}
    failed = run(store.fail_step(step.id, error, partial))
    assert (failed.state, failed.error, failed.response_payload) == (FAILED, error, partial)
    assert failed.finished_at is not None
    assert run(store.get_step(step.id)) == failed


@pytest.mark.parametrize("start", [PENDING, PROCESSING])
def test_cancel(store: Store, start: str) -> None:
    response_id, (step,) = run(response_with_steps(store))
    for target in PATHS[start]:
        run(transition(store, step.id, target))
    canceled = run(store.cancel_step(step.id))
    assert canceled.state == CANCELED and canceled.finished_at is not None
    assert run(store.get_step(step.id)) == canceled


@pytest.mark.parametrize(("src", "dst"), ILLEGAL)
def test_illegal_transition_rejected(store: Store, src: str, dst: str) -> None:
    response_id, (step,) = run(response_with_steps(store))
    for target in PATHS[src]:
        run(transition(store, step.id, target))
    before = run(store.get_step(step.id))
    with pytest.raises(StepStateError) as info:
        run(transition(store, step.id, dst))
    message = str(info.value)
    assert step.id in message and repr(src) in message and repr(dst) in message
    assert run(store.get_step(step.id)) == before


@pytest.mark.parametrize("target", TARGETS)
def test_transition_of_unknown_step(store: Store, target: str) -> None:
    with pytest.raises(StoreNotFoundError, match="step_missing"):
        run(transition(store, "step_missing", target))
    assert run(store.get_step("step_missing")) is None


def test_record_attempt(store: Store) -> None:
    response_id, (step,) = run(response_with_steps(store))
    first = {"type": "rate_limit", "message": "429 from upstream"}
    run(store.record_attempt(step.id, first, "https://a.example/v1"))
    run(store.record_attempt(step.id, None))  # no error: appends nothing, keeps the upstream
    got = run(store.get_step(step.id))
    assert got is not None
    assert (got.attempts, got.upstream) == ([first], "https://a.example/v1")
    run(store.record_attempt(step.id, {"type": "timeout", "message": "t"}, "b"))
    got = run(store.get_step(step.id))
    assert got is not None and len(got.attempts) == 2 and got.upstream == "b"
    with pytest.raises(StoreNotFoundError):
        run(store.record_attempt("step_missing", None))


def reference_outcome(state: str, target: str) -> str | None:
    """The state after requesting ``target`` from ``state``, or None if it must be refused."""
    return target if target in ALLOWED_TRANSITIONS[state] else None


def test_random_transition_sequences_follow_the_table(store: Store) -> None:
    reachable = reachable_states()

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(TARGETS)), max_size=12))
    def check(requests: list[tuple[int, str]]) -> None:
        async def go() -> None:
            _, steps = await response_with_steps(store, 3)
            expected = {s.id: PENDING for s in steps}
            for index, target in requests:
                step_id = steps[index].id
                after = reference_outcome(expected[step_id], target)
                try:
                    got = await transition(store, step_id, target)
                except StepStateError as exc:
                    assert after is None, exc
                    assert repr(expected[step_id]) in str(exc)
                else:
                    assert got.state == after
                    expected[step_id] = after
            for s in steps:
                stored = await store.get_step(s.id)
                assert stored is not None
                assert stored.state == expected[s.id] and stored.state in reachable

        run(go())

    check()


def test_concurrent_transition_requests_follow_the_table(store: Store) -> None:
    reachable = reachable_states()

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=8))
    def check(targets: list[str]) -> None:
        async def go() -> None:
            _, (step,) = await response_with_steps(store)
            results = await asyncio.gather(
                *(transition(store, step.id, t) for t in targets), return_exceptions=True
            )
            final = await store.get_step(step.id)
            assert final is not None and final.state in reachable
            won = [r.state for r in results if isinstance(r, Step)]
            refused = [t for t, r in zip(targets, results) if not isinstance(r, Step)]
            assert all(isinstance(r, (Step, StepStateError)) for r in results)
            # The successes form a path from pending (processing, if any, comes first).
            path = sorted(won, key=lambda s: s != PROCESSING)
            state = PENDING
            for nxt in path:
                assert nxt in ALLOWED_TRANSITIONS[state]
                state = nxt
            assert final.state == state
            assert final.attempt == won.count(PROCESSING)
            # Each refusal is refused by some state the step was in.
            visited = [PENDING, *path]
            for t in refused:
                assert any(t not in ALLOWED_TRANSITIONS[s] for s in visited)

        run(go())

    check()


# -- scopes ------------------------------------------------------------------------------------


def test_chains_never_mix_scopes(store: Store) -> None:
    async def go() -> None:
        response_id, (model,) = await response_with_steps(store)
        agent, other = await store.record_steps(
            response_id, None, model.id, [tool_call("call_agent"), tool_call("call_http")]
        )
        sub = await store.record_steps(response_id, agent.id, None, [model_call(), model_call()])
        sub_tool = await store.record_steps(response_id, agent.id, sub[-1].id, [tool_call("c")])
        nested = await store.record_steps(response_id, sub_tool[0].id, None, [model_call()])
        after = await store.record_steps(response_id, None, other.id, [model_call()])

        top = await store.list_chain(response_id)
        assert [s.id for s in top] == [model.id, agent.id, other.id, after[0].id]
        scoped = await store.list_chain(response_id, agent.id)
        assert [s.id for s in scoped] == [sub[0].id, sub[1].id, sub_tool[0].id]
        assert scoped[0].prev_step_id is None and scoped[2].prev_step_id == sub[1].id
        assert all(s.scope_parent == agent.id for s in scoped)
        assert await store.list_chain(response_id, sub_tool[0].id) == nested
        assert await store.list_chain(response_id, "step_unknown") == []

        every = await store.list_steps(response_id)
        assert [s.sequence for s in every] == list(range(1, 9))
        assert {s.id for s in every} == {s.id for s in [*top, *scoped, *nested]}

    run(go())


def test_list_unfinished_steps(store: Store) -> None:
    async def go() -> None:
        _, steps_a = await response_with_steps(store, 4)
        _, steps_b = await response_with_steps(store, 2)
        await store.mark_processing(steps_a[0].id)
        await transition(store, steps_a[1].id, PROCESSING)
        await transition(store, steps_a[1].id, COMPLETED)
        await store.fail_step(steps_a[2].id, {"type": "x", "message": "y"})
        await store.cancel_step(steps_b[0].id)
        unfinished = await store.list_unfinished_steps()
        assert [(s.id, s.state) for s in unfinished] == [
            (steps_a[0].id, PROCESSING),
            (steps_a[3].id, PENDING),
            (steps_b[1].id, PENDING),
        ]

    run(go())


# -- tools -------------------------------------------------------------------------------------


def test_tools_crud(store: Store) -> None:
    async def go() -> None:
        weather = {"name": "weather", "parameters": {"type": "object"}, "url": "http://a/"}
        add = {"name": "add", "parameters": {"type": "object"}, "url": "http://b/"}
        await store.create_tool(weather)
        await store.create_tool(add)
        with pytest.raises(StoreConflictError):
            await store.create_tool({"name": "weather"})
        assert await store.get_tool("weather") == weather
        assert await store.get_tool("missing") is None
        assert await store.list_tools() == [add, weather]

        weather2 = {**weather, "timeout_s": 3}
        await store.replace_tool("weather", weather2)
        assert await store.get_tool("weather") == weather2
        with pytest.raises(StoreNotFoundError):
            await store.replace_tool("missing", {"name": "missing"})
        with pytest.raises(ValueError):
            await store.replace_tool("weather", {"name": "other"})
        with pytest.raises(ValueError):
            await store.create_tool({"parameters": {}})

        assert await store.delete_tool("add") is True
        assert await store.delete_tool("add") is False
        assert await store.list_tools() == [weather2]

    run(go())


def test_complete_step_with_the_response_result_in_one_write(store: Store) -> None:
    response_id, (step,) = run(response_with_steps(store))
    run(store.mark_processing(step.id))
    result = {"status": "completed", "output": [{"type": "message"}], "completed_at": 5.0}
    done = run(store.complete_step(step.id, {"ok": True}, {"total_tokens": 3},
                                   upstream="u1", response_update=result))
    assert (done.state, done.upstream) == ("completed", "u1")
    record = run(store.get_response(response_id))
    assert record is not None and (record.status, record.output, record.completed_at) == (
        "completed", [{"type": "message"}], 5.0)
    # A refused transition writes neither.
    with pytest.raises(StepStateError):
        run(store.complete_step(step.id, {}, response_update={"status": "failed"}))
    assert run(store.get_response(response_id)).status == "completed"
    with pytest.raises(ValueError):
        run(store.complete_step(step.id, {}, response_update={"tenant": "x"}))


def test_calls_queued_together_commit_together_and_fail_alone(tmp_path: Path) -> None:
    """Store calls that pile up while the worker is busy run as one transaction (one commit),
    and when one of them fails the group falls back to one call at a time: the illegal one
    raises alone, the others are committed before their callers hear back (another connection
    sees them)."""
    path = tmp_path / "store.db"

    async def main() -> tuple[list[Any], str, list[str]]:
        store = SQLiteStore(path)
        await store.open()
        try:
            response_id, steps = await response_with_steps(store, 3)
            executor = store._executor
            assert executor is not None
            release, started = threading.Event(), threading.Event()

            def hold() -> None:
                started.set()
                release.wait(10)

            executor.submit(hold)
            await asyncio.to_thread(started.wait, 10)
            other = new_response()
            calls = [
                store.mark_processing(steps[0].id),
                store.complete_step(steps[1].id, {"object": "chat.completion"}),  # pending: illegal
                store.mark_processing(steps[2].id),
                store.create_response(other),
            ]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.sleep(0.05)  # all four queued behind the held call
            release.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            # Read with a separate connection: what the callers were told is committed.
            with sqlite3.connect(path) as conn:
                states = [
                    conn.execute("SELECT state FROM steps WHERE id = ?", (s.id,)).fetchone()[0]
                    for s in steps
                ]
                assert conn.execute("SELECT 1 FROM responses WHERE id = ?", (other.id,)).fetchone()
            return outcomes, response_id, states
        finally:
            await store.close()

    outcomes, _response_id, states = run(main())
    assert isinstance(outcomes[1], StepStateError)
    assert [o.state for o in (outcomes[0], outcomes[2])] == [PROCESSING, PROCESSING]
    assert states == [PROCESSING, PENDING, PROCESSING]


def test_appends_queued_together_share_a_statement_and_keep_their_own_errors(
    tmp_path: Path,
) -> None:
    """Appends that pile up while the worker is busy (the flushes of concurrent streams, due on
    the same tick) go as one multi-row INSERT (sqlite_ops.append_events_together); a stale
    fence, an overlap and an unknown response each get their own error and write nothing, the
    good ones are committed; two appends of one response in a group each see the other."""
    path = tmp_path / "store.db"

    async def main() -> None:
        store = SQLiteStore(path)
        await store.open()
        executor = store._executor
        assert executor is not None
        statements: list[str] = []

        def trace() -> None:  # the worker's connection: statements are traced on its thread
            assert store._conn is not None
            store._conn.set_trace_callback(statements.append)

        release, started = threading.Event(), threading.Event()

        def hold() -> None:
            started.set()
            release.wait(10)

        async def queued(*calls: Any) -> list[Any]:
            """Run ``calls`` queued behind a held worker: one batch, in order."""
            release.clear()
            started.clear()
            executor.submit(hold)
            await asyncio.to_thread(started.wait, 10)
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.sleep(0.05)
            statements.clear()
            release.set()
            return await asyncio.gather(*tasks, return_exceptions=True)

        try:
            records = [new_response() for _ in range(6)]
            for record in records:
                await store.create_response(record, owner="A", lease_s=60, events=(0, [b"e0"]))
            fence = Fence("A", 1)
            good, (stale, overlapped) = records[:4], records[4:]
            await executor.submit(trace)

            results = await queued(
                *(store.append_events(r.id, 1, [b"e1", f"e2 {r.id}".encode()], fence=fence) for r in good),
                store.append_events(stale.id, 1, [b"late"], fence=Fence("A", 2)),
                store.append_events(overlapped.id, 0, [b"again"]),
                store.append_events("resp_unknown", 0, [b"x"]),
            )
            assert results[:4] == [None] * 4
            assert [type(e) for e in results[4:]] == [FencedError, StoreConflictError, StoreNotFoundError]
            with sqlite3.connect(path) as conn:  # what the callers were told is committed
                for record in good:
                    assert conn.execute(
                        "SELECT first_sequence_number, last_sequence_number, data FROM event_batches"
                        " WHERE response_id = ? ORDER BY 2", (record.id,)
                    ).fetchall() == [(0, 0, b"e0"), (1, 2, b"e1" + f"e2 {record.id}".encode())]
            for record in (stale, overlapped):
                assert await store.list_events(record.id) == [(0, b"e0")]
            # Rows the statement leaves out (no overlap to make it fail): the same.
            results = await queued(
                store.append_events(stale.id, 1, [b"late"], fence=Fence("A", 2)),
                store.append_events(overlapped.id, 1, [b"e1"], fence=fence),
                store.append_events("resp_unknown", 0, [b"x"]),
            )
            assert results[1] is None
            assert [type(e) for e in results[::2]] == [FencedError, StoreNotFoundError]
            assert await store.list_events(stale.id) == [(0, b"e0")]

            # Without a bad one, the group is one statement, and still exact.
            results = await queued(*(store.append_events(r.id, 3, [b"e3"], fence=fence) for r in good))
            assert results == [None] * 4
            inserts = [s for s in statements if s.startswith("INSERT INTO event_batches")]
            assert len(inserts) == 1  # traced with its values bound: all four ids are in it
            assert all(f"'{r.id}'" in inserts[0] for r in good)
            for record in good:
                assert [n for n, _ in await store.list_events(record.id)] == [0, 1, 2, 3]

            # More than a statement's rows (sqlite_ops.ROWS_PER_STATEMENT): one statement per
            # chunk, in the one transaction; a bad append in the last chunk undoes the first's.
            many = [new_response() for _ in range(sqlite_ops.ROWS_PER_STATEMENT + 8)]
            for record in many:
                await store.create_response(record, owner="A", lease_s=60)
            results = await queued(*(store.append_events(r.id, 0, [b"m0"], fence=fence) for r in many))
            assert results == [None] * len(many)
            assert len([s for s in statements if s.startswith("INSERT INTO event_batches")]) == 2
            results = await queued(
                *(store.append_events(r.id, 1, [b"m1"], fence=fence) for r in many[:-1]),
                store.append_events(many[-1].id, 1, [b"m1"], fence=Fence("A", 2)),  # stale
            )
            assert results[:-1] == [None] * (len(many) - 1) and isinstance(results[-1], FencedError)
            for record in many:
                stored = [n for n, _ in await store.list_events(record.id)]
                assert stored == ([0] if record is many[-1] else [0, 1])

            # Two of one response in a group: the second sees the first (an overlap fails).
            one = good[0].id
            results = await queued(
                store.append_events(one, 4, [b"e4", b"e5"], fence=fence),
                store.append_events(one, 5, [b"e5 again", b"e6"], fence=fence),
                store.append_events(good[1].id, 4, [b"e4"], fence=fence),
            )
            assert results[0] is None and results[2] is None
            assert isinstance(results[1], StoreConflictError)
            assert await store.list_events(one, after=3) == [(4, b"e4"), (5, b"e5")]
        finally:
            release.set()
            await store.close()

    run(main())
