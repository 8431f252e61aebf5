"""Scenarios 6 and 7 of issue 6: what a step costs the store, and what a held stream costs in RAM.

6. store cost: the store driven directly — :class:`store.sqlite.SQLiteStore` (WAL on, the gateway's default
   ``synchronous=NORMAL``), each step going ``record_steps`` (→ pending) → ``mark_processing`` →
   ``complete_step``: three recorded transitions. Reported as µs per transition, one chain at a
   time (latency of each call, including the hop to the store's thread) and 16 chains at once
   (wall time ÷ transitions: throughput).
7. memory: a fresh gateway process holds N slow streams at once (the upstream trickles a piece
   every interval); its ``VmRSS`` is sampled every 50 ms. Reported per held stream:
   (RSS with the most streams held − RSS idle after a warm-up) ÷ streams held then, in KB.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from store import Store, open_store
from store.types import MODEL_CALL, ResponseRecord, StepDescriptor, new_id

from .loadgen import Sample, Worker, run_load, summarize
from .processes import ServerProcess, rss_kb, start_gateway
from .report import Row
from .scenarios import (
    GATEWAY_DELTA,
    LOCALHOST,
    MODEL,
    TEXT,
    Bench,
    check_response,
    check_response_stream,
    http_request,
)

__all__ = ["scenario_memory", "scenario_store", "store_cost"]

_REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": TEXT}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: " + TEXT},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31},
}  # fmt: skip
_USAGE = _COMPLETION["usage"]
_STEPS_PER_RESPONSE = 4


def _events(step: int, count: int) -> tuple[int, list[bytes]] | None:
    """``count`` SSE frames of a typical text delta, numbered after the previous step's."""
    if not count:
        return None
    first = step * count
    return first, [
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"item_id":"msg_0123456789abcdef0123456789abcdef","output_index":0,"content_index":0,'
        b'"delta":"Echo: a few words","sequence_number":' + str(first + i).encode() + b"}\n\n"
        for i in range(count)
    ]


async def _chain(
    store: Store, response_ids: list[str], steps: int, timings: list[float], events: int = 0
) -> None:
    prev: str | None = None
    response_index = -1
    for i in range(steps):
        if i % _STEPS_PER_RESPONSE == 0:
            response_index += 1
            prev = None
        rid = response_ids[response_index]
        t0 = time.perf_counter()
        (step,) = await store.record_steps(rid, None, prev, [StepDescriptor(MODEL_CALL, _REQUEST)])
        t1 = time.perf_counter()
        await store.mark_processing(step.id)
        t2 = time.perf_counter()
        await store.complete_step(step.id, _COMPLETION, _USAGE, events=_events(i, events))
        t3 = time.perf_counter()
        timings += (t1 - t0, t2 - t1, t3 - t2)
        prev = step.id


async def store_cost(
    path: Path | str, steps: int, chains: int, *, events: int = 0
) -> dict[str, Any]:
    """Record ``steps`` steps (3 transitions each) in ``chains`` concurrent chains on a fresh
    database (an SQLite file path or a PostgreSQL URL), ``events`` SSE frames riding each
    ``complete_step`` (the durable event log); returns ``{"transitions", "wall_s",
    "us_per_transition", "latency_ms", "journal_mode", "synchronous"}`` (latency_ms:
    p50/p90/p99/mean/max of single calls; journal/synchronous for SQLite only)."""
    store = open_store(str(path))
    await store.open()
    per_chain = steps // chains
    timings: list[float] = []
    try:
        response_ids = []
        for _ in range(chains * -(-per_chain // _STEPS_PER_RESPONSE)):
            rid = new_id("resp")
            await store.create_response(
                ResponseRecord(id=rid, model=MODEL, request={"model": MODEL, "input": TEXT},
                               created_at=time.time())
            )  # fmt: skip
            response_ids.append(rid)
        per = len(response_ids) // chains
        t0 = time.perf_counter()
        await asyncio.gather(*(
            _chain(store, response_ids[i * per:(i + 1) * per], per_chain, timings, events)
            for i in range(chains)
        ))  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        await store.close()
    journal = "-"
    if isinstance(path, Path):
        with sqlite3.connect(path) as conn:
            journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    transitions = len(timings)
    return {
        "transitions": transitions,
        "wall_s": wall,
        "us_per_transition": wall * 1e6 / transitions,
        "latency_ms": summarize([t * 1000 for t in timings]),
        "journal_mode": journal,
        "synchronous": "NORMAL" if isinstance(path, Path) else "-",
        "events_per_step": events,
    }


def _store_row(result: dict[str, Any], chains: int, backend: str, events: int) -> Row:
    lat = result["latency_ms"]
    suffix = f"+ev{events}" if events else ""
    note = f"{result['us_per_transition']:.0f} µs/transition"
    if backend == "SQLite":
        note += f", journal={result['journal_mode']}, synchronous={result['synchronous']}"
    if events:
        note += f", {events} SSE events per completed step in the same transaction"
    row = Row(
        id=f"6/store{'' if backend == 'SQLite' else '-pg'}/c{chains}{suffix}",
        scenario=f"6 store ({backend})",
        target=("1 chain" if chains == 1 else f"{chains} chains") + (f", {events} events/step" if events else ""),
        concurrency=chains, requests=result["transitions"],
        rps=result["transitions"] / result["wall_s"],
        p50_ms=lat["p50"], p90_ms=lat["p90"], p99_ms=lat["p99"],
        note=note, extra=result,
    )  # fmt: skip
    if backend == "SQLite" and result["journal_mode"].lower() != "wal":
        row.errors = 1
        row.first_error = f"journal_mode is {result['journal_mode']}, not wal"
    return row


async def scenario_store(b: Bench) -> list[Row]:
    """6: µs per recorded step transition, one chain and 16 chains at once, without and with 8
    SSE events per completed step (the durable event log): SQLite (WAL on), then PostgreSQL when
    the run has a server (``b.pg``, :mod:`bench.postgres`; none with ``--no-postgres``)."""
    rows = []
    cases = [(chains, events) for chains in (1, 16) for events in (0, 8)]
    for chains, events in cases:
        result = await store_cost(
            b.work_dir / f"store-{chains}-{events}.db", b.sizes.store_steps, chains, events=events
        )
        rows.append(_store_row(result, chains, "SQLite", events))
    if b.pg is None:
        return rows  # no PostgreSQL in this run: SQLite rows only
    for chains, events in cases:
        url = await asyncio.to_thread(b.pg.new_database)
        result = await store_cost(url, b.sizes.store_steps, chains, events=events)
        rows.append(_store_row(result, chains, "PostgreSQL", events))
    return rows


async def _warm(gateway: ServerProcess) -> int:
    body = orjson.dumps({"model": MODEL, "input": TEXT})
    stream_body = orjson.dumps({"model": MODEL, "input": TEXT, "stream": True})
    errors = 0
    for request in (
        http_request(gateway, b"POST", "/v1/responses", body, check_response),
        http_request(gateway, b"POST", "/v1/responses", stream_body, check_response_stream, GATEWAY_DELTA),
    ):
        errors += (await run_load(request, concurrency=16, count=64)).errors
    return errors


async def scenario_memory(b: Bench) -> list[Row]:
    """7: gateway RSS per held slow stream (a fresh gateway process and SQLite file)."""
    sizes = b.sizes
    gateway = await asyncio.to_thread(
        start_gateway, b.upstream.url + "/v1", b.work_dir, name="gateway-memory"
    )
    try:
        warm_errors = await _warm(gateway)
        await asyncio.sleep(0.5)
        idle_kb = rss_kb(gateway.pid)
        body = orjson.dumps({
            "model": MODEL, "stream": True,
            "input": f"slow {sizes.stream_chunks} {sizes.stream_interval_ms}",
        })  # fmt: skip
        seen = done = 0
        samples: list[tuple[int, int]] = []
        running = True

        def opened() -> None:
            nonlocal seen
            seen += 1

        async def one(worker: Worker, index: int) -> Sample:
            nonlocal done
            reply = await worker.request(
                LOCALHOST, gateway.port, b"POST", "/v1/responses", body,
                marker=b"event: response.created", on_marker=opened,
            )  # fmt: skip
            if reply.t_marker is not None:
                done += 1
            error = check_response_stream(reply)
            return Sample(reply.t_end - reply.t_start, ok=error is None, error=error)

        async def sample() -> None:
            while running:
                samples.append((seen - done, rss_kb(gateway.pid)))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        hold_s = (sizes.stream_chunks + 3) * sizes.stream_interval_ms / 1000
        try:
            result = await run_load(one, concurrency=sizes.streams, count=sizes.streams, timeout_s=hold_s + 120)
        finally:
            running = False
            await sampler
        after_kb = rss_kb(gateway.pid)
    finally:
        await asyncio.to_thread(gateway.stop)
    peak_held = max((h for h, _ in samples), default=0)
    held_kb = max((r for h, r in samples if h == peak_held), default=idle_kb)
    # VmRSS is in KiB; the target is in KB (1,000 bytes).
    per_stream = (held_kb - idle_kb) * 1.024 / peak_held if peak_held else None
    lat = result.latency_ms()
    row = Row(
        id="7/gateway", scenario="7 memory", target="stepchain",
        concurrency=sizes.streams, requests=result.count, errors=result.errors + warm_errors,
        p50_ms=lat["p50"], p90_ms=lat["p90"], p99_ms=lat["p99"],
        note=(f"RSS {idle_kb / 1024:.1f} MiB idle → {held_kb / 1024:.1f} MiB holding {peak_held} "
              f"streams = {per_stream:.1f} KB/stream" if per_stream is not None
              else "no stream was held"),
        first_error=result.first_error,
        extra={
            "idle_kb": idle_kb, "held_kb": held_kb, "peak_held": peak_held,
            "kb_per_stream": per_stream, "after_kb": after_kb,
            "peak_kb": max((r for _, r in samples), default=idle_kb),
            "stream_seconds": hold_s,
        },
    )  # fmt: skip
    if peak_held < sizes.streams and row.errors == 0:
        row.note += f" (only {peak_held} of {sizes.streams} held at once)"
    return [row]
