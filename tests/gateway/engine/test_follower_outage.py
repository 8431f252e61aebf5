"""A follower of a stored stream (``GET /v1/responses/{id}?stream=true&starting_after=N`` for a
response this process does not run) pauses while PostgreSQL is away — keep-alive comments,
retries with backoff — and goes on exactly where it was once the database is back: every event
once, in order, then the terminal event. After ``outage_s`` without an answer it ends with an
``error`` event naming the ``starting_after`` to resume with.

Real PostgreSQL (the session's throwaway server, stopped with ``pg_ctl stop -m immediate`` and
started again), real ``stepchain serve`` processes and real HTTP streams.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import ExitStack

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.engine.live import follow_store
from gateway.engine.store_retry import retry_unavailable
from gateway.protocol.sse import encode_event
from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from store import open_store
from store.types import Fence, ResponseRecord
from tests.gateway.engine.test_durability import DONE, _split, _status, gateway

FIRST = "Looking that up for you now. " * 4
SECOND = "The answer, after the database came back, is 42. " * 6
KEEP_ALIVE = b": keep-alive\n\n"


def _managed(pg_server) -> None:
    if not pg_server.managed:
        pytest.skip("needs a throwaway PostgreSQL server it may stop")


def _event(sequence: int, kind: str = "response.output_text.delta") -> bytes:
    return encode_event({"type": kind, "sequence_number": sequence, "delta": f"d{sequence}"})


def test_followers_wait_out_an_outage_or_give_up_after_outage_s(pg_server, pg_dsn):
    """Two followers of one response while the server is down: one waits it out (keep-alives
    during the outage, then the rest of the events exactly once), the other (``outage_s`` 1 s)
    ends with the ``error`` event."""
    _managed(pg_server)

    async def main() -> None:
        # A short pool timeout: each try during the outage fails within half a second.
        store = open_store(pg_dsn, pool_timeout_s=0.5)
        await store.open()
        fence = Fence("me", 1)
        tasks: list[asyncio.Future] = []
        try:
            await store.create_response(
                ResponseRecord(id="resp_follow", model="m", request={"model": "m"}, created_at=1.0),
                owner="me", lease_s=600,
            )  # fmt: skip
            events = [_event(i) for i in range(6)] + [_event(6, "response.completed")]
            await store.append_events("resp_follow", 0, events[:3], fence=fence)
            loop = asyncio.get_running_loop()
            received: dict[str, list[tuple[float, bytes]]] = {"patient": [], "brief": []}

            async def follow(name: str, outage_s: float) -> None:
                async for chunk in follow_store(
                    store, "resp_follow", 0, keep_alive_s=0.3, outage_s=outage_s
                ):
                    received[name].append((loop.time(), chunk))

            patient = asyncio.ensure_future(follow("patient", 120))
            brief = asyncio.ensure_future(follow("brief", 1.0))
            tasks += (patient, brief)
            while len(received["patient"]) < 1 or len(received["brief"]) < 1:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # both wait for events now
            stopped = loop.time()
            await asyncio.to_thread(pg_server.stop)
            try:
                await asyncio.wait_for(brief, 30)  # gives up within about outage_s
                await asyncio.sleep(1.0)
                assert not patient.done()
            finally:
                await asyncio.to_thread(pg_server.start)
            restarted = loop.time()
            # The pool's connections died with the server: the first calls may fail still.
            await retry_unavailable(
                lambda: store.append_events("resp_follow", 3, events[3:], fence=fence)
            )
            await asyncio.wait_for(patient, 60)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.close()

        chunks = [chunk for _t, chunk in received["patient"]]
        assert b"".join(c for c in chunks if c != KEEP_ALIVE) == b"".join(events[1:])
        assert any(stopped < t < restarted for t, c in received["patient"] if c == KEEP_ALIVE)
        brief_chunks = [chunk for _t, chunk in received["brief"] if chunk != KEEP_ALIVE]
        assert brief_chunks[0] == b"".join(events[1:3])
        error = orjson.loads(brief_chunks[-1].split(b"data: ", 1)[1])
        assert brief_chunks[-1].startswith(b"event: error\n") and len(brief_chunks) == 2
        assert error["code"] == "store_unavailable" and error["sequence_number"] == 2
        assert "starting_after=2" in error["message"] and "127.0.0.1" not in error["message"]

    asyncio.run(main())


def test_a_follower_on_another_process_pauses_through_a_database_restart(pg_server, pg_dsn, tmp_path):
    """Gateway A runs a background response; gateway B follows its stream from the store.
    While A waits for a tool, PostgreSQL is stopped and started again: B's client keeps its
    connection and gets every stored event once, in order, ending with response.completed."""
    _managed(pg_server)
    release = threading.Event()
    tool_calls: list[str] = []

    async def tool(request: Request) -> JSONResponse:
        tool_calls.append(request.url.path)
        await asyncio.to_thread(release.wait, 120)  # until the database has been restarted
        return JSONResponse({"answer": 42})

    def script(body: dict) -> Reply:
        if any(m["role"] == "tool" for m in body["messages"]):
            return Reply(content=SECOND, chunk_size=5, chunk_delay_s=0.01)
        return Reply(content=FIRST, chunk_size=5, chunk_delay_s=0.01,
                     tool_calls=[{"id": "call_1", "name": "lookup", "arguments": "{}"}])  # fmt: skip

    follower: dict = {"raw": b""}

    def follow(url: str, response_id: str) -> None:
        try:
            with httpx.stream(
                "GET", f"{url}/v1/responses/{response_id}",
                params={"stream": "true", "starting_after": "-1"}, timeout=120,
            ) as reply:  # fmt: skip
                follower["status"] = reply.status_code
                for chunk in reply.iter_raw():
                    follower["raw"] += chunk
        except Exception as exc:  # the stream cut: the test fails on it below
            follower["error"] = repr(exc)
        follower["ended_at"] = time.monotonic()

    with ExitStack() as stack:
        upstream = stack.enter_context(serve_app(create_scripted_upstream(ScriptedModel(default=script))))
        tools = stack.enter_context(serve_app(Starlette(routes=[Route("/tool", tool, methods=["POST"])])))
        url_a, _ = stack.enter_context(gateway(pg_dsn, f"{upstream}/v1", tmp_path / "a.log"))
        httpx.post(f"{url_a}/v1/tools", json={
            "name": "lookup", "description": "d", "url": f"{tools}/tool", "idempotent": True,
        }).raise_for_status()  # fmt: skip
        url_b, _ = stack.enter_context(gateway(pg_dsn, f"{upstream}/v1", tmp_path / "b.log"))
        started = httpx.post(f"{url_a}/v1/responses", timeout=30, json={
            "model": "scripted-model", "input": "go", "background": True,
        }).json()  # fmt: skip
        deadline = time.monotonic() + 30
        while not tool_calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        thread = threading.Thread(target=follow, args=(url_b, started["id"]))
        thread.start()
        try:
            while b"response.mcp_call.in_progress" not in follower["raw"]:
                assert time.monotonic() < deadline and thread.is_alive(), follower
                time.sleep(0.02)
            time.sleep(0.5)  # B's follower waits for new events; nothing is being written
            pg_server.stop()
            try:
                time.sleep(3.0)  # B's store calls fail meanwhile: its follower must hold on
            finally:
                pg_server.start()
            restarted = time.monotonic()
            release.set()
            thread.join(120)
        finally:
            release.set()
        assert not thread.is_alive()
    assert "error" not in follower, follower
    assert follower["ended_at"] > restarted
    frames = _split(follower["raw"])
    assert frames[-1] == DONE
    stored = [event for _seq, event in _status(pg_dsn, started["id"])["events"]]
    assert frames[:-1] == stored  # each stored event once, in order, nothing else
    assert stored[-1].startswith(b"event: response.completed\n")
    sequences = [orjson.loads(f.split(b"data: ", 1)[1])["sequence_number"] for f in stored]
    assert sequences == list(range(len(stored)))
    assert SECOND.split()[1].encode() in b"".join(stored)


def test_an_in_process_follower_reads_dropped_events_through_an_outage(pg_server, pg_dsn):
    """A follower in the owner's process whose first events were dropped from the bounded
    cache reads them from the store; with PostgreSQL stopped it waits, and once the server is
    back it gets every event once, in order."""
    from gateway.engine.live import LiveStreams
    from gateway.engine.writer import ResponseWriter

    _managed(pg_server)

    async def main() -> None:
        store = open_store(pg_dsn, pool_timeout_s=0.5)
        await store.open()
        try:
            await store.create_response(
                ResponseRecord(id="resp_cached", model="m", request={"model": "m"}, created_at=1.0),
                owner="me", lease_s=600,
            )  # fmt: skip
            live = LiveStreams(max_bytes_per_response=400)
            log = live.open("resp_cached")
            writer = ResponseWriter(store, "resp_cached", Fence("me", 1), log, flush_s=0.001)
            events = [_event(i) for i in range(20)]
            for event in events:
                log.emit(event)
            await writer.flush()
            assert log.persisted == 20 and log.base > 0  # the front is only in the store now
            received: list[bytes] = []

            async def follow() -> None:
                async for chunk in log.follow(0, store):
                    received.append(chunk)
                    if b"".join(received) == b"".join(events):
                        return

            await asyncio.to_thread(pg_server.stop)
            try:
                task = asyncio.ensure_future(follow())
                await asyncio.sleep(1.5)  # it is waiting for the store, not ended
                assert not task.done() and received == []
            finally:
                await asyncio.to_thread(pg_server.start)
            await asyncio.wait_for(task, 60)
            assert b"".join(received) == b"".join(events)
            await writer.close()
        finally:
            await store.close()

    asyncio.run(main())


def test_a_replay_from_the_chain_waits_out_a_lost_connection(pg_dsn, tmp_path):
    """``GET ?stream=true`` of a finished response that was not streamed has no event log: its
    events are rebuilt from its chain. The chain's read loses its connection (a proxy cuts the
    answer) and the database then refuses new connections for a second: the stream waits, then
    delivers the whole replay and ``[DONE]``, identical to a replay when nothing failed. (Before,
    that read was the one store read of the path without the outage retry: the stream broke.)"""
    from tests.chaos.commit_cut import proxy_in_thread
    from tests.gateway.engine.test_durability import MODEL, _reattach
    from tests.gateway.engine.test_retried_writes import _target, _via

    model = ScriptedModel(default=lambda body: Reply(content=SECOND))
    with ExitStack() as stack:
        proxy = stack.enter_context(proxy_in_thread(*_target(pg_dsn)))
        upstream = stack.enter_context(serve_app(create_scripted_upstream(model)))
        url, _ = stack.enter_context(gateway(_via(pg_dsn, proxy.port), f"{upstream}/v1", tmp_path / "gw.log"))
        posted = httpx.post(f"{url}/v1/responses", timeout=30, json={"model": MODEL, "input": "hi"})
        assert posted.status_code == 200 and posted.json()["status"] == "completed", posted.text
        response_id = posted.json()["id"]
        expected = _reattach(url, response_id, -1)  # nothing failing
        # The next read of its chain loses its answer; then the database looks down.
        proxy.cut_after(b"FROM steps WHERE response_id", response_id.encode(), then_refuse=True)
        result: dict = {}

        def replay() -> None:
            try:
                result["events"] = _reattach(url, response_id, -1)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        reader = threading.Thread(target=replay)
        reader.start()
        deadline = time.monotonic() + 30
        while proxy.cuts < 1:
            assert time.monotonic() < deadline, "the chain was not read"
            time.sleep(0.02)
        time.sleep(1.0)  # refused meanwhile: the replay's read keeps retrying
        proxy.accept()
        reader.join(60)
    assert "error" not in result, result.get("error")
    assert result["events"] == expected
    last = orjson.loads(expected[-1].split(b"data: ", 1)[1])
    assert last["type"] == "response.completed"
    assert last["response"]["output"][-1]["content"][0]["text"] == SECOND
