"""Scenario 8: CPU instructions per response, counted by valgrind (callgrind), not timed.

Times on a shared 2-core VM vary by tens of percent between runs; instruction counts repeat to
about a percent, so they show whether a change made the hot path leaner. (``perf stat -e
instructions`` would be cheaper, but hypervisors often hide the PMU; this machine's does.)

For each target — the gateway and the Starlette+httpx floor proxy (:mod:`bench.floorproxy`) —
a fresh server process runs under ``valgrind --tool=callgrind --instr-atstart=no``. After
``warmup`` requests (imports, connection pools and caches settled), instrumentation is switched
on with ``callgrind_control -i on`` (and left on), the counters are zeroed (``-z``), ``count``
requests run one at a time, and a dump (``callgrind_control -d``) gives the instructions executed
in that window (all threads: the
SQLite thread counts). Rows: instructions per response for ``POST /v1/responses`` non-streamed
(scenario 1's request) and streamed (scenario 2's), and for the tool loop (scenario 3's request,
per recorded step: one model call, four tool calls, one model call); the streamed request again
on a gateway with the durable event log switched off (:mod:`bench.no_event_log`): its cost. The upstream and the tool
server run outside valgrind and are not counted.

Raises :class:`InstructionsUnavailable` (the scenario reports it and the run goes on) when
valgrind is not installed.
"""

from __future__ import annotations

import asyncio
import glob
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from .loadgen import HTTPReply, Worker
from .processes import ServerProcess, start_floor_proxy, start_gateway
from .report import Row

__all__ = ["InstructionsUnavailable", "count_instructions", "scenario_instructions"]

_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)
TOOL_LOOP_STEPS = 6  # model call, four tool calls, model call


class InstructionsUnavailable(RuntimeError):
    """valgrind/callgrind_control is missing; ``str(exc)`` says which."""


def _callgrind(work_dir: Path, name: str) -> list[str]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise InstructionsUnavailable("valgrind (callgrind) is not installed")
    return [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-systime=no",
        f"--callgrind-out-file={work_dir / f'callgrind.{name}.%p'}",
    ]  # fmt: skip


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _dumped_total(work_dir: Path, name: str, pid: int) -> int:
    """Instructions of the last dump of ``pid`` (callgrind numbers dumps ``.1``, ``.2``…)."""
    files = sorted(
        glob.glob(str(work_dir / f"callgrind.{name}.{pid}.*")),
        key=lambda f: int(f.rsplit(".", 1)[1]) if f.rsplit(".", 1)[1].isdigit() else 0,
    )
    if not files:
        raise RuntimeError(f"callgrind wrote no dump for {name} (pid {pid})")
    data = Path(files[-1]).read_bytes()
    match = _TOTALS.search(data)
    if match is None:
        raise RuntimeError(f"no totals line in {files[-1]}")
    return int(match.group(1))


async def count_instructions(
    server: ServerProcess, name: str, work_dir: Path, send: Callable[[Worker], Awaitable[str | None]],
    *, warmup: int, count: int,
) -> int:  # fmt: skip
    """Instructions ``server`` (running under :func:`_callgrind`) executes for ``count`` calls of
    ``send`` after ``warmup`` calls; ``send`` returns an error string or None."""
    worker = Worker(0)
    try:
        for _ in range(warmup):
            error = await send(worker)
            if error:
                raise RuntimeError(f"{name} warm-up: {error}")
        # Instrumentation stays on once switched on (toggling it off and on again garbles the
        # counters); each window starts from zeroed counters and ends with a dump.
        await asyncio.to_thread(_control, "-i", "on", str(server.pid))
        await asyncio.to_thread(_control, "-z", str(server.pid))
        for _ in range(count):
            error = await send(worker)
            if error:
                raise RuntimeError(f"{name}: {error}")
        await asyncio.to_thread(_control, "-d", str(server.pid))
    finally:
        await worker.aclose()
    return _dumped_total(work_dir, name, server.pid)


def _post(server: ServerProcess, body: dict, check: Callable[[HTTPReply], str | None]) -> Callable[[Worker], Awaitable[str | None]]:
    raw = orjson.dumps(body)

    async def send(worker: Worker) -> str | None:
        reply = await asyncio.wait_for(
            worker.request("127.0.0.1", server.port, b"POST", "/v1/responses", raw), 300
        )
        return check(reply)

    return send


async def scenario_instructions(b) -> list[Row]:  # b: bench.scenarios.Bench
    """8: instructions per response, gateway vs the Starlette+httpx floor (see the module doc)."""
    from .scenarios import MODEL, TEXT, TOOL_TEXT, check_response, check_response_stream

    quick = b.sizes.responses.get(1, 0) < 100
    warmup, count = (10, 20) if quick else (40, 100)
    upstream_v1 = b.upstream.url + "/v1"
    rows: list[Row] = []
    cases = [
        ("responses", {"model": MODEL, "input": TEXT}, check_response, 1),
        ("stream", {"model": MODEL, "input": TEXT, "stream": True}, check_response_stream, 1),
        ("tool loop", {"model": MODEL, "input": TOOL_TEXT,
                       "tools": [{"type": "function", "name": n} for n in b.tool_names]},
         None, TOOL_LOOP_STEPS),
    ]  # fmt: skip
    gateway = await asyncio.to_thread(
        start_gateway, upstream_v1, b.work_dir, name="gateway-callgrind",
        wrap=_callgrind(b.work_dir, "gateway"), timeout_s=300,
    )  # fmt: skip
    try:
        from .scenarios import register_tools

        await asyncio.to_thread(register_tools, gateway.url, b.tools.url, b.tool_names)
        for label, body, check, steps in cases:
            checker = check or _tool_loop_check
            total = await count_instructions(
                gateway, "gateway", b.work_dir, _post(gateway, body, checker), warmup=warmup, count=count
            )
            per = total / count
            unit = "per recorded step" if steps > 1 else "per response"
            rows.append(Row(
                id=f"8/gateway/{label.replace(' ', '-')}", scenario="8 instructions", target="stepchain",
                concurrency=1, requests=count, note=f"{label}: {per / steps / 1e6:.2f} M instructions {unit}",
                extra={"instructions": per / steps, "unit": unit},
            ))  # fmt: skip
    finally:
        gateway.stop(timeout_s=60)
    # The durable event log's cost: the streamed request on the same gateway without it.
    nolog = await asyncio.to_thread(
        start_gateway, upstream_v1, b.work_dir, name="gateway-nolog-callgrind",
        wrap=_callgrind(b.work_dir, "gateway-nolog"), timeout_s=300, event_log=False,
    )  # fmt: skip
    try:
        body, check = cases[1][1], cases[1][2]
        total = await count_instructions(
            nolog, "gateway-nolog", b.work_dir, _post(nolog, body, check), warmup=warmup, count=count
        )
        per = total / count
        with_log = rows[1].extra["instructions"]
        rows.append(Row(
            id="8/gateway-nolog/stream", scenario="8 instructions", target="stepchain, event log off",
            concurrency=1, requests=count,
            note=f"stream: {per / 1e6:.2f} M instructions per response (measurement switch); "
                 f"the event log: ×{with_log / per:.2f}",
            extra={"instructions": per, "unit": "per response", "event_log_ratio": with_log / per},
        ))  # fmt: skip
    finally:
        nolog.stop(timeout_s=60)
    if b.pg is not None:
        rows += await _postgres_event_log_rows(b, cases[1][1], cases[1][2], warmup, count)
    floor = await asyncio.to_thread(
        start_floor_proxy, upstream_v1, b.work_dir, mode="starlette-httpx",
        wrap=_callgrind(b.work_dir, "floor"), timeout_s=300,
    )  # fmt: skip
    try:
        body, check = cases[0][1], cases[0][2]
        total = await count_instructions(floor, "floor", b.work_dir, _post(floor, body, check), warmup=warmup, count=count)
        per = total / count
        ours = rows[0].extra["instructions"]
        rows.append(Row(
            id="8/floor-starlette/responses", scenario="8 instructions", target="floor: Starlette+httpx proxy",
            concurrency=1, requests=count,
            note=f"responses: {per / 1e6:.2f} M instructions per response; stepchain ×{ours / per:.2f}",
            extra={"instructions": per, "unit": "per response", "stepchain_ratio": ours / per},
        ))  # fmt: skip
    finally:
        floor.stop(timeout_s=60)
    return rows


def _tool_loop_check(reply: HTTPReply) -> str | None:
    if reply.status != 200:
        return f"HTTP {reply.status}: {reply.body[:200]!r}"
    body = orjson.loads(reply.body)
    if body.get("status") != "completed":
        return f"status {body.get('status')}"
    from .scenarios import failed_tool_call

    return failed_tool_call(body, TOOL_LOOP_STEPS - 2)


async def _postgres_event_log_rows(b, body: dict, check: Callable[[HTTPReply], str | None],
                                   warmup: int, count: int) -> list[Row]:  # fmt: skip
    """Scenario 2's request counted on gateways on PostgreSQL (each on a database of its own),
    with and without the event log: the log's cost on PostgreSQL, in the gateway's instructions
    (the server's own work is not counted)."""
    per: dict[bool, float] = {}
    for event_log in (True, False):
        name = "gateway-pg" if event_log else "gateway-pg-nolog"
        server = await asyncio.to_thread(
            start_gateway, b.upstream.url + "/v1", b.work_dir, name=f"{name}-callgrind", db=b.pg.new_database(),
            wrap=_callgrind(b.work_dir, name), timeout_s=300, event_log=event_log,
        )  # fmt: skip
        try:
            total = await count_instructions(
                server, name, b.work_dir, _post(server, body, check), warmup=warmup, count=count
            )
        finally:
            server.stop(timeout_s=60)
        per[event_log] = total / count
    ratio = per[True] / per[False]
    return [
        Row(id="8/gateway-pg/stream", scenario="8 instructions", target="stepchain (PostgreSQL)",
            concurrency=1, requests=count, note=f"stream: {per[True] / 1e6:.2f} M instructions per response",
            extra={"instructions": per[True], "unit": "per response"}),
        Row(id="8/gateway-pg-nolog/stream", scenario="8 instructions", target="stepchain (PostgreSQL), event log off",
            concurrency=1, requests=count,
            note=f"stream: {per[False] / 1e6:.2f} M instructions per response (measurement switch); "
                 f"the event log: ×{ratio:.2f}",
            extra={"instructions": per[False], "unit": "per response", "event_log_ratio": ratio}),
    ]  # fmt: skip

