"""Scenarios 0–5 of issue 6: request latency through the gateway against the upstream itself.

Each scenario measures the direct-to-upstream baseline and the gateway (and the peer, when one
runs) in the same run, same concurrency, same request count, one after the other, and returns
:class:`bench.report.Row` objects whose ``added_*`` columns are gateway − direct.

0. load generator ceiling: ``GET /ping`` on the upstream (raw client, and httpx for comparison)
1. ``POST /v1/responses``, non-streaming, one model call, no tools; with two floors, do-nothing
   proxies built from the same libraries (:mod:`bench.floorproxy`): what the stack alone adds
2. the same streamed: time to the first ``response.output_text.delta``, and to the last byte
3. tool loop: model → 4 parallel HTTP tools → model (the direct baseline is a client doing it)
4. ``POST /v1/chat/completions`` passthrough
5. a ``previous_response_id`` conversation (the baseline resends the whole history)

Scenarios 6 (store) and 7 (memory) are in :mod:`bench.resources`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from .loadgen import (
    HTTPReply,
    LoadResult,
    RequestFn,
    Sample,
    Worker,
    run_load,
)
from .processes import ServerProcess, cpu_seconds
from .report import Row
from .upstream import SLOW_PREFIX, TOOLS_PHRASE

__all__ = ["FLOORS", "FULL", "QUICK", "TOOL_PARAMETERS", "Bench", "Sizes", "register_tools"]

MODEL = "scripted-model"
TEXT = "Say hello to the benchmark, please, in one short sentence."
TOOL_TEXT = f"Please {TOOLS_PHRASE} now."
TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"q": {"type": "string"}},
    "required": ["q"],
}
GATEWAY_DELTA = b"event: response.output_text.delta"
UPSTREAM_DELTA = b'"delta":{"content":'
LOCALHOST = "127.0.0.1"
# Scenario 1's floors: (row key, bench.floorproxy mode, Bench field, table target).
FLOORS = (
    ("starlette", "starlette-httpx", "floor_starlette", "floor: Starlette+httpx proxy"),
    ("asgi", "asgi-aiohttp", "floor_asgi", "floor: raw ASGI+aiohttp proxy"),
)
FLOOR_NOTE = "stores nothing, does nothing"


@dataclass(frozen=True)
class Sizes:
    """Request counts: ``{concurrency: requests}`` per scenario, and the other scenarios' sizes."""

    ceiling: int
    httpx_ceiling: int
    responses: dict[int, int]
    stream: dict[int, int]
    tool_loop: dict[int, int]
    chat: dict[int, int]
    conversations: int
    turns: int
    store_steps: int
    streams: int
    stream_chunks: int
    stream_interval_ms: int
    tools: int = 4
    tool_latency_ms: float = 10.0
    replicas_concurrency: int = 64
    replicas_requests: int = 2000


FULL = Sizes(
    ceiling=6000,
    httpx_ceiling=2000,
    responses={1: 300, 16: 1000, 64: 1000},
    stream={1: 300, 16: 1000, 64: 1000},
    tool_loop={1: 100, 16: 400},
    chat={1: 300, 16: 1000, 64: 1000},
    conversations=10,
    turns=100,
    store_steps=6000,
    streams=1000,
    stream_chunks=12,
    stream_interval_ms=1000,
)

QUICK = Sizes(
    ceiling=400,
    httpx_ceiling=200,
    responses={1: 30, 16: 128, 64: 128},
    stream={1: 20, 16: 96, 64: 128},
    tool_loop={1: 10, 16: 48},
    chat={1: 30, 16: 128, 64: 128},
    conversations=1,
    turns=100,
    store_steps=300,
    streams=100,
    stream_chunks=4,
    stream_interval_ms=500,
    replicas_concurrency=32,
    replicas_requests=192,
)


@dataclass
class Bench:
    """The running servers of one benchmark run and its sizes. The floor proxies
    (:mod:`bench.floorproxy`) run only when scenario 1 does."""

    upstream: ServerProcess
    tools: ServerProcess
    gateway: ServerProcess
    peer: ServerProcess | None
    work_dir: Path
    sizes: Sizes
    tool_names: list[str]
    floor_starlette: ServerProcess | None = None
    floor_asgi: ServerProcess | None = None
    # vLLM's agentic-api (bench.peers), against the upstream's /v1/responses mode.
    agentic: ServerProcess | None = None
    # Scenario 9's duration in seconds.
    sustained_s: float = 600.0
    gateway_pg: ServerProcess | None = None  # the same gateway on PostgreSQL (bench.postgres)
    # The same gateways with the durable event log switched off (bench.no_event_log): scenario 2.
    gateway_nolog: ServerProcess | None = None
    gateway_pg_nolog: ServerProcess | None = None
    pg: Any = None  # bench.postgres.PgBench when a PostgreSQL server runs
    pg_replicas: bool = False  # scenario 10 runs (not in a --quick run without --postgres)


def tool_names(count: int) -> list[str]:
    return [f"bench_tool_{i}" for i in range(count)]


def register_tools(gateway_url: str, tools_url: str, names: list[str]) -> None:
    """Register the HTTP tools on the gateway (``attach: on_request``: only scenario 3 uses them)."""
    with httpx.Client(timeout=10) as client:
        for name in names:
            reply = client.post(
                gateway_url + "/v1/tools",
                json={
                    "name": name,
                    "description": f"Benchmark tool {name}: answers after a fixed latency.",
                    "parameters": TOOL_PARAMETERS,
                    "kind": "http",
                    "attach": "on_request",
                    "url": f"{tools_url}/{name}",
                    "timeout_s": 30,
                    # The tool server listens on 127.0.0.1, which the egress policy refuses
                    # unless the admin allows it: without this every call failed as
                    # blocked_url and the scenario measured no tool call at all.
                    "allow_private": True,
                },
            )
            if reply.status_code not in (200, 201):
                raise RuntimeError(f"registering tool {name}: HTTP {reply.status_code} {reply.text[:200]}")


# --- checks: None when the reply is what the scenario expects, else the error text --------------


def failed_tool_call(response: dict, expected: int) -> str | None:
    """Why a tool-loop Response did not run ``expected`` tool calls successfully (its
    ``mcp_call`` items), or None."""
    calls = [item for item in response.get("output") or () if item.get("type") == "mcp_call"]
    if len(calls) != expected:
        return f"expected {expected} tool calls in the output, got {len(calls)}"
    for call in calls:
        if call.get("error"):
            return f"tool call {call.get('name')} failed: {str(call['error'])[:200]}"
    return None


def _http_error(reply: HTTPReply) -> str | None:
    if reply.status != 200:
        return f"HTTP {reply.status}: {reply.body[:300].decode(errors='replace')}"
    return None


def check_response(reply: HTTPReply) -> str | None:
    """A completed Response object (its first ``"status"`` is the response's own)."""
    error = _http_error(reply)
    if error:
        return error
    at = reply.body.find(b'"status":"')
    if at < 0 or not reply.body.startswith(b"completed", at + 10):
        return f"response not completed: {reply.body[:300].decode(errors='replace')}"
    return None


def check_response_stream(reply: HTTPReply) -> str | None:
    error = _http_error(reply)
    if error:
        return error
    if b"event: response.completed" not in reply.body:
        return f"stream did not complete: ...{reply.body[-300:].decode(errors='replace')}"
    return None


def check_chat(reply: HTTPReply) -> str | None:
    error = _http_error(reply)
    if error:
        return error
    if b'"chat.completion"' not in reply.body:
        return f"not a chat.completion: {reply.body[:300].decode(errors='replace')}"
    return None


def check_chat_stream(reply: HTTPReply) -> str | None:
    error = _http_error(reply)
    if error:
        return error
    if not reply.body.rstrip().endswith(b"data: [DONE]"):
        return f"stream did not end with [DONE]: ...{reply.body[-200:].decode(errors='replace')}"
    return None


def check_pong(reply: HTTPReply) -> str | None:
    return _http_error(reply) or (None if reply.body == b"pong" else f"body {reply.body[:50]!r}")


# --- requests and measurement ----------------------------------------------------------------------


def http_request(
    server: ServerProcess,
    method: bytes,
    path: str,
    body: bytes | None,
    check: Callable[[HTTPReply], str | None],
    marker: bytes | None = None,
) -> RequestFn:
    """A RequestFn sending the same request each time; ``first_s`` is the time to ``marker``."""
    port = server.port

    async def one(worker: Worker, index: int) -> Sample:
        reply = await worker.request(LOCALHOST, port, method, path, body, marker=marker)
        error = check(reply)
        first = None if reply.t_marker is None else reply.t_marker - reply.t_start
        if error is None and marker is not None and first is None:
            error = f"no {marker!r} in the body"
        return Sample(reply.t_end - reply.t_start, first, ok=error is None, error=error)

    return one


def warmup_for(concurrency: int, count: int) -> int:
    """Enough to open every connection and warm the servers' caches, never more than ``count``."""
    return min(max(concurrency, 20), count)


async def measure(request: RequestFn, server: ServerProcess, concurrency: int, count: int) -> LoadResult:
    """run_load with the server's CPU seconds as the probe."""
    return await run_load(
        request,
        concurrency=concurrency,
        count=count,
        warmup=warmup_for(concurrency, count),
        probe=lambda: cpu_seconds(server.pid),
    )


def load_row(
    row_id: str,
    scenario: str,
    target: str,
    result: LoadResult,
    *,
    base: Row | None = None,
    first: bool = False,
    note: str = "",
) -> Row:
    """A Row from a LoadResult: latency to the last byte (or to the marker with ``first``)."""
    stats = result.first_ms() if first else result.latency_ms()
    n = max(result.count, 1)
    row = Row(
        id=row_id,
        scenario=scenario,
        target=target,
        concurrency=result.concurrency,
        requests=result.count,
        errors=result.errors,
        rps=result.rps,
        p50_ms=stats["p50"],
        p90_ms=stats["p90"],
        p99_ms=stats["p99"],
        server_cpu_us=None if result.probe_delta is None else result.probe_delta * 1e6 / n,
        client_cpu_us=result.client_cpu_s * 1e6 / n,
        note=note,
        first_error=result.first_error,
    )
    if base is not None:
        row.added_p50_ms = row.p50_ms - base.p50_ms  # type: ignore[operator]
        row.added_p99_ms = row.p99_ms - base.p99_ms  # type: ignore[operator]
    return row


def peer_note(peer: Row, ours: Row) -> str:
    """``added ×R p50 / ×R p99 vs stepchain`` (and the same in ``peer.extra``)."""
    parts = []
    for pct in ("p50", "p99"):
        theirs = getattr(peer, f"added_{pct}_ms")
        mine = getattr(ours, f"added_{pct}_ms")
        ratio = theirs / mine if mine and mine > 0 else None
        peer.extra[f"added_{pct}_ratio"] = ratio
        parts.append(f"×{ratio:.1f} {pct}" if ratio is not None else f"{pct} n/a")
    return "added " + ", ".join(parts) + " vs stepchain"


# --- scenarios ---------------------------------------------------------------------------------


async def scenario_ceiling(b: Bench) -> list[Row]:
    """0: the load generator against ``GET /ping`` (raw client at c=16 and 64; httpx at 16)."""
    rows = []
    ping = http_request(b.upstream, b"GET", "/ping", None, check_pong)
    for c in (16, 64):
        result = await measure(ping, b.upstream, c, b.sizes.ceiling)
        rows.append(load_row(f"0/raw/c{c}", "0 load generator", "raw client /ping", result))
    url = b.upstream.url + "/ping"
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(limits=limits) as client:

        async def one(worker: Worker, index: int) -> Sample:
            t0 = time.perf_counter()
            reply = await client.get(url)
            ok = reply.status_code == 200 and reply.content == b"pong"
            return Sample(time.perf_counter() - t0, ok=ok, error=None if ok else f"HTTP {reply.status_code}")

        result = await measure(one, b.upstream, 16, b.sizes.httpx_ceiling)
    rows.append(load_row("0/httpx/c16", "0 load generator", "httpx /ping", result, note="for comparison only"))
    return rows


async def scenario_responses(b: Bench) -> list[Row]:
    """1: ``POST /v1/responses`` non-streaming vs a direct chat completion (and the peer), and
    the floors: the same request through each do-nothing proxy that runs."""
    direct_body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": TEXT}]})
    body = orjson.dumps({"model": MODEL, "input": TEXT})
    direct = http_request(b.upstream, b"POST", "/v1/chat/completions", direct_body, check_chat)
    rows = []
    for c, n in b.sizes.responses.items():
        base = load_row(f"1/direct/c{c}", "1 responses", "direct upstream", await measure(direct, b.upstream, c, n))
        gateway = http_request(b.gateway, b"POST", "/v1/responses", body, check_response)
        ours = load_row(
            f"1/gateway/c{c}", "1 responses", "stepchain", await measure(gateway, b.gateway, c, n), base=base
        )
        rows += [base, ours]
        if b.gateway_pg is not None:
            on_pg = http_request(b.gateway_pg, b"POST", "/v1/responses", body, check_response)
            rows.append(load_row(f"1/gateway-pg/c{c}", "1 responses", "stepchain (PostgreSQL)",
                                 await measure(on_pg, b.gateway_pg, c, n), base=base))  # fmt: skip
        for key, _, field, target in FLOORS:
            floor: ServerProcess | None = getattr(b, field)
            if floor is not None:
                request = http_request(floor, b"POST", "/v1/responses", body, check_response)
                rows.append(load_row(
                    f"1/floor-{key}/c{c}", "1 responses", target, await measure(request, floor, c, n),
                    base=base, note=FLOOR_NOTE,
                ))  # fmt: skip
        if b.peer is not None:
            peer = http_request(b.peer, b"POST", "/v1/responses", body, check_response)
            theirs = load_row(
                f"1/litellm/c{c}", "1 responses", "litellm", await measure(peer, b.peer, c, n), base=base
            )
            theirs.note = peer_note(theirs, ours)
            rows.append(theirs)
        if b.agentic is not None:
            # agentic-api's own baseline: the same script through the upstream's Responses mode.
            direct_responses = http_request(b.upstream, b"POST", "/v1/responses", body, check_response)
            rbase = load_row(
                f"1/direct-responses/c{c}", "1 responses", "direct upstream (responses mode)",
                await measure(direct_responses, b.upstream, c, n),
            )  # fmt: skip
            agentic = http_request(b.agentic, b"POST", "/v1/responses", body, check_response)
            theirs = load_row(
                f"1/agentic/c{c}", "1 responses", "agentic-api",
                await measure(agentic, b.agentic, c, n), base=rbase,
            )  # fmt: skip
            theirs.note = peer_note(theirs, ours)
            rows += [rbase, theirs]
    return rows


async def scenario_stream(b: Bench) -> list[Row]:
    """2: streamed responses: time to first delta and to last byte, vs a streamed chat completion."""
    direct_body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": TEXT}], "stream": True}
    )
    body = orjson.dumps({"model": MODEL, "input": TEXT, "stream": True})
    direct = http_request(
        b.upstream, b"POST", "/v1/chat/completions", direct_body, check_chat_stream, UPSTREAM_DELTA
    )
    gateway = http_request(b.gateway, b"POST", "/v1/responses", body, check_response_stream, GATEWAY_DELTA)
    first_rows, last_rows = [], []
    for c, n in b.sizes.stream.items():
        d = await measure(direct, b.upstream, c, n)
        g = await measure(gateway, b.gateway, c, n)
        d_first = load_row(f"2/ttfd/direct/c{c}", "2 stream: first delta", "direct upstream", d, first=True)
        first_rows += [
            d_first,
            load_row(f"2/ttfd/gateway/c{c}", "2 stream: first delta", "stepchain", g, base=d_first, first=True),
        ]
        d_last = load_row(f"2/ttlb/direct/c{c}", "2 stream: last byte", "direct upstream", d)
        g_last = load_row(f"2/ttlb/gateway/c{c}", "2 stream: last byte", "stepchain", g, base=d_last)
        last_rows += [d_last, g_last]
        if b.agentic is not None:
            direct_responses = http_request(
                b.upstream, b"POST", "/v1/responses", body, check_response_stream, GATEWAY_DELTA
            )
            agentic = http_request(b.agentic, b"POST", "/v1/responses", body, check_response_stream, GATEWAY_DELTA)
            rd = await measure(direct_responses, b.upstream, c, n)
            a = await measure(agentic, b.agentic, c, n)
            rd_first = load_row(f"2/ttfd/direct-responses/c{c}", "2 stream: first delta",
                                "direct upstream (responses mode)", rd, first=True)  # fmt: skip
            a_first = load_row(f"2/ttfd/agentic/c{c}", "2 stream: first delta", "agentic-api", a,
                               base=rd_first, first=True)  # fmt: skip
            a_first.note = peer_note(a_first, first_rows[-1])
            rd_last = load_row(f"2/ttlb/direct-responses/c{c}", "2 stream: last byte",
                               "direct upstream (responses mode)", rd)  # fmt: skip
            a_last = load_row(f"2/ttlb/agentic/c{c}", "2 stream: last byte", "agentic-api", a, base=rd_last)
            a_last.note = peer_note(a_last, g_last)
            first_rows += [rd_first, a_first]
            last_rows += [rd_last, a_last]
        if b.gateway_nolog is not None:
            await _event_log_rows(b.gateway_nolog, "gateway-nolog", "stepchain, event log off", c, n, body,
                            (gateway, b.gateway, g), d_first, d_last, first_rows, last_rows)  # fmt: skip
        if b.gateway_pg is not None:
            on_pg = http_request(b.gateway_pg, b"POST", "/v1/responses", body, check_response_stream, GATEWAY_DELTA)
            p = await measure(on_pg, b.gateway_pg, c, n)
            first_rows.append(load_row(f"2/ttfd/gateway-pg/c{c}", "2 stream: first delta",
                                       "stepchain (PostgreSQL)", p, base=d_first, first=True))  # fmt: skip
            last_rows.append(load_row(f"2/ttlb/gateway-pg/c{c}", "2 stream: last byte",
                                      "stepchain (PostgreSQL)", p, base=d_last))  # fmt: skip
            if b.gateway_pg_nolog is not None:
                await _event_log_rows(b.gateway_pg_nolog, "gateway-pg-nolog", "stepchain (PostgreSQL), event log off",
                                c, n, body, (on_pg, b.gateway_pg, p), d_first, d_last, first_rows, last_rows)  # fmt: skip
    if 16 in b.sizes.stream:
        n = max(32, b.sizes.stream[16] // 6)
        for pair in ((b.gateway, b.gateway_nolog, "gateway", "stepchain"),
                     (b.gateway_pg, b.gateway_pg_nolog, "gateway-pg", "stepchain (PostgreSQL)")):  # fmt: skip
            if pair[0] is not None and pair[1] is not None:
                for pacing in PACINGS:
                    last_rows += await _paced_event_log_rows(*pair, 16, n, pacing)
    return first_rows + last_rows


# Paced streams, (deltas, ms apart, row key). 40 deltas 5 ms apart (200 tokens/s, as a fast
# model does): the log stores them in several writes (``stream_flush_s`` apart), where a
# burst's share one or two. 20 deltas 20 ms apart (50 tokens/s, a typical hosted model): its
# deltas come about as far apart as ``stream_flush_s``, so about one write per delta.
PACINGS = ((40, 5, "paced"), (20, 20, "paced20"))


async def _paced_event_log_rows(
    with_log: ServerProcess, without_log: ServerProcess, key: str, target: str, c: int, n: int,
    pacing: tuple[int, int, str] = PACINGS[0],
) -> list[Row]:
    """The event log's cost on a paced stream (``pacing``: deltas, ms apart, row key; one of
    :data:`PACINGS`): the gateway CPU per streamed response with it ÷ without it
    (``extra["event_log_ratio"]``), over blocks in ABBA order (:func:`_cpu_abba`)."""
    deltas, interval_ms, row_key = pacing
    body = orjson.dumps({"model": MODEL, "input": f"{SLOW_PREFIX}{deltas} {interval_ms}", "stream": True})
    scenario = f"2 paced stream ({deltas} × {interval_ms} ms)"
    requests = [http_request(server, b"POST", "/v1/responses", body, check_response_stream, GATEWAY_DELTA)
                for server in (with_log, without_log)]  # fmt: skip
    on_first = await measure(requests[0], with_log, c, n)
    off_first = await measure(requests[1], without_log, c, n)
    rows = [
        load_row(f"2/{row_key}/{key}/c{c}", scenario, target, on_first),
        load_row(f"2/{row_key}/{key}-nolog/c{c}", scenario, f"{target}, event log off", off_first),
    ]
    on, off = await _cpu_abba((requests[0], with_log, on_first), (requests[1], without_log, off_first), c, n)
    if on and off:
        for row in rows:
            row.extra.update(event_log_ratio=on / off, cpu_with_log_us=on, cpu_without_log_us=off)
        rows[1].note = f"measurement switch; the event log: ×{on / off:.2f} gateway CPU ({on:,.0f} vs {off:,.0f} µs, ABBA)"
    return rows


async def _cpu_abba(
    on: tuple[RequestFn, ServerProcess, LoadResult], off: tuple[RequestFn, ServerProcess, LoadResult],
    c: int, n: int,
) -> tuple[float | None, float | None]:
    """Gateway CPU µs per request with and without the event log, each over two blocks of
    ``n`` measured in the order on, off, off, on (the first two given: ``on[2]``, ``off[2]``):
    a drift of the machine's speed during the four weighs on both sides alike. Single timed
    blocks moved the ratio by ±0.1 between runs."""
    off_again = await measure(off[0], off[1], c, n)
    on_again = await measure(on[0], on[1], c, n)

    def per_request(*results: LoadResult) -> float | None:
        deltas = [r.probe_delta for r in results]
        if any(d is None for d in deltas):
            return None
        return sum(d for d in deltas if d is not None) * 1e6 / sum(max(r.count, 1) for r in results)

    return per_request(on[2], on_again), per_request(off[2], off_again)


async def _event_log_rows(
    server: ServerProcess, key: str, target: str, c: int, n: int, body: bytes,
    with_log: tuple[RequestFn, ServerProcess, LoadResult],
    d_first: Row, d_last: Row, first_rows: list[Row], last_rows: list[Row],
) -> None:  # fmt: skip
    """Scenario 2's request against ``server`` (:mod:`bench.no_event_log`), measured right
    after the same gateway with its event log (``with_log``: its request, process and result):
    the event log's cost is the gateway CPU per streamed response with it ÷ without it
    (``extra["event_log_ratio"]``), over blocks in ABBA order (:func:`_cpu_abba`)."""
    request = http_request(server, b"POST", "/v1/responses", body, check_response_stream, GATEWAY_DELTA)
    result = await measure(request, server, c, n)
    first = load_row(f"2/ttfd/{key}/c{c}", "2 stream: first delta", target, result, base=d_first, first=True)
    last = load_row(f"2/ttlb/{key}/c{c}", "2 stream: last byte", target, result, base=d_last)
    on, off = await _cpu_abba(with_log, (request, server, result), c, n)
    if on is not None and off:
        ratio = on / off
        for row in (first, last):
            row.extra.update(event_log_ratio=ratio, cpu_with_log_us=on, cpu_without_log_us=off)
            row.note = f"measurement switch; the event log: ×{ratio:.2f} gateway CPU ({on:,.0f} vs {off:,.0f} µs, ABBA)"
    first_rows.append(first)
    last_rows.append(last)


async def scenario_tool_loop(b: Bench) -> list[Row]:
    """3: model → N parallel HTTP tools → model; the baseline is a client running that loop."""
    names = b.tool_names
    tools_spec = [
        {"type": "function", "function": {"name": n, "description": "bench", "parameters": TOOL_PARAMETERS}}
        for n in names
    ]
    user = {"role": "user", "content": TOOL_TEXT}
    first_body = orjson.dumps({"model": MODEL, "messages": [user], "tools": tools_spec})
    up_port, tools_port = b.upstream.port, b.tools.port

    async def direct(worker: Worker, index: int) -> Sample:
        t0 = time.perf_counter()
        r1 = await worker.request(LOCALHOST, up_port, b"POST", "/v1/chat/completions", first_body)
        if r1.status != 200:
            return Sample(0.0, ok=False, error=_http_error(r1))
        message = orjson.loads(r1.body)["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        if len(calls) != len(names):
            return Sample(0.0, ok=False, error=f"expected {len(names)} tool calls, got {len(calls)}")
        outputs = await asyncio.gather(*(
            worker.request(LOCALHOST, tools_port, b"POST", "/" + call["function"]["name"],
                           call["function"]["arguments"].encode())
            for call in calls
        ))  # fmt: skip
        messages = [user, message] + [
            {"role": "tool", "tool_call_id": call["id"], "content": out.body.decode()}
            for call, out in zip(calls, outputs)
        ]
        r2 = await worker.request(
            LOCALHOST, up_port, b"POST", "/v1/chat/completions",
            orjson.dumps({"model": MODEL, "messages": messages, "tools": tools_spec}),
        )  # fmt: skip
        ok = r2.status == 200 and b"Tool results" in r2.body
        return Sample(time.perf_counter() - t0, ok=ok, error=None if ok else _http_error(r2) or "no summary")

    body = orjson.dumps(
        {"model": MODEL, "input": TOOL_TEXT, "tools": [{"type": "function", "name": n} for n in names]}
    )

    def check(reply: HTTPReply) -> str | None:
        error = check_response(reply)
        if error is None and b"Tool results" not in reply.body:
            error = f"no tool results in the answer: {reply.body[:300].decode(errors='replace')}"
        return error or failed_tool_call(orjson.loads(reply.body), len(names))

    gateway = http_request(b.gateway, b"POST", "/v1/responses", body, check)
    rows = []
    note = f"{len(names)} tools × {b.sizes.tool_latency_ms:g} ms"
    for c, n in b.sizes.tool_loop.items():
        base = load_row(
            f"3/direct/c{c}", "3 tool loop", "direct (client loop)", await measure(direct, b.upstream, c, n),
            note=note,
        )  # fmt: skip
        rows += [base, load_row(
            f"3/gateway/c{c}", "3 tool loop", "stepchain", await measure(gateway, b.gateway, c, n),
            base=base, note=note,
        )]  # fmt: skip
    return rows


async def scenario_chat(b: Bench) -> list[Row]:
    """4: ``POST /v1/chat/completions`` through the gateway (and the peer) vs the upstream."""
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": TEXT}]})
    rows = []
    for c, n in b.sizes.chat.items():
        direct = http_request(b.upstream, b"POST", "/v1/chat/completions", body, check_chat)
        base = load_row(f"4/direct/c{c}", "4 chat passthrough", "direct upstream", await measure(direct, b.upstream, c, n))
        gateway = http_request(b.gateway, b"POST", "/v1/chat/completions", body, check_chat)
        ours = load_row(
            f"4/gateway/c{c}", "4 chat passthrough", "stepchain", await measure(gateway, b.gateway, c, n), base=base
        )
        rows += [base, ours]
        if b.peer is not None:
            peer = http_request(b.peer, b"POST", "/v1/chat/completions", body, check_chat)
            theirs = load_row(
                f"4/litellm/c{c}", "4 chat passthrough", "litellm", await measure(peer, b.peer, c, n), base=base
            )
            theirs.note = peer_note(theirs, ours)
            rows.append(theirs)
    return rows
