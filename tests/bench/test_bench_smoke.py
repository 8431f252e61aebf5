"""The benchmark harness's own pieces, without the gateway: percentile math, the load generator
against a real uvicorn server on loopback, the bench upstream's script, scenario 1's floor
proxies (started as processes, as a run starts them) and the report.

No timing assertions: only counts, shapes, and orderings that hold by construction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.__main__ import main as bench_main
from bench.floorproxy import MODES, create_floor_app
from bench.loadgen import (
    HTTPConnection,
    Sample,
    Worker,
    percentile,
    run_load,
    summarize,
)
from bench.processes import start_floor_proxy, start_upstream
from bench.report import (
    Row,
    evaluate_targets,
    floor_notes,
    render_floor_notes,
    render_table,
    write_json,
)
from bench.scenarios import (
    FLOORS,
    QUICK,
    Bench,
    check_chat_stream,
    check_response,
    scenario_responses,
)
from bench.toolserver import create_tool_app
from bench.upstream import bench_reply, create_bench_upstream
from gateway.testing.serving import serve_app

# --- percentile math ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        pytest.param([5.0], 50, 5.0, id="single"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.5, id="median-even"),
        pytest.param([1.0, 2.0, 3.0], 50, 2.0, id="median-odd"),
        pytest.param([float(i) for i in range(1, 101)], 99, 99.01, id="p99-of-1..100"),
        pytest.param([float(i) for i in range(1, 101)], 90, 90.1, id="p90-of-1..100"),
        pytest.param([0.0, 10.0], 0, 0.0, id="q0-is-min"),
        pytest.param([0.0, 10.0], 100, 10.0, id="q100-is-max"),
        pytest.param([0.0, 10.0], 25, 2.5, id="interpolated"),
    ],
)
def test_percentile_matches_linear_interpolation(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200),
    st.floats(min_value=0, max_value=100),
    st.floats(min_value=0, max_value=100),
)
def test_percentile_is_bounded_and_monotone(values: list[float], q1: float, q2: float) -> None:
    ordered = sorted(values)
    lo, hi = sorted((q1, q2))
    assert ordered[0] <= percentile(ordered, lo) <= percentile(ordered, hi) <= ordered[-1]


def test_summarize_of_nothing_is_nan() -> None:
    assert all(math.isnan(v) for v in summarize([]).values())
    assert summarize([2.0, 4.0]) == {"p50": 3.0, "p90": 3.8, "p99": pytest.approx(3.98), "mean": 3.0, "max": 4.0}


# --- the load generator against a real server ------------------------------------------------------


class _Counting:
    """A trivial ASGI app: ``/json`` (Content-Length), ``/stream`` (chunked, marker in piece 3),
    ``/fail`` (500), ``/close`` (asks to close the connection). Counts requests."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            for piece in (b"event: a\n\n", b"event: b\n\n", b"event: MARK", b"ER\n\n", b"event: end\n\n"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b""})
            return
        status = 500 if path == "/fail" else 200
        headers = [(b"content-type", b"application/json")]
        if path == "/close":
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps({"echo": len(body)})})


def _request(port: int, path: str, marker: bytes | None = None):
    async def one(worker: Worker, index: int) -> Sample:
        reply = await worker.request("127.0.0.1", port, b"POST", path, b'{"i":%d}' % index, marker=marker)
        first = None if reply.t_marker is None else reply.t_marker - reply.t_start
        ok = reply.status == 200
        return Sample(reply.t_end - reply.t_start, first, ok=ok, error=None if ok else f"HTTP {reply.status}")

    return one


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("path", ["/json", "/close"])
def test_run_load_makes_exactly_count_plus_warmup_requests(path: str) -> None:
    app = _Counting()
    with serve_app(app) as url:
        result = asyncio.run(run_load(_request(_port(url), path), concurrency=4, count=60, warmup=7))
    assert app.requests == 67
    assert result.errors == 0 and result.count == 60 and len(result.samples) == 60
    assert result.rps > 0 and result.wall_s > 0
    stats = result.latency_ms()
    assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_chunked_stream_marker_across_pieces() -> None:
    app = _Counting()
    with serve_app(app) as url:
        result = asyncio.run(run_load(_request(_port(url), "/stream", b"MARKER"), concurrency=3, count=20))
    assert result.errors == 0
    for sample in result.samples:
        assert sample.first_s is not None and 0 < sample.first_s <= sample.latency_s
    assert result.first_ms()["p50"] <= result.latency_ms()["p50"]


def test_errors_are_counted_not_raised() -> None:
    app = _Counting()
    with serve_app(app) as url:
        result = asyncio.run(run_load(_request(_port(url), "/fail"), concurrency=2, count=10, warmup=2))
        refused = asyncio.run(run_load(_request(1, "/json"), concurrency=2, count=4))
    assert result.errors == 12 and result.samples == [] and result.first_error == "HTTP 500"
    assert refused.errors == 4 and "Error" in (refused.first_error or "")


def test_connection_reads_whole_body_and_reuses_the_socket() -> None:
    app = _Counting()

    async def go(port: int) -> list[int]:
        conn = HTTPConnection("127.0.0.1", port)
        try:
            replies = [await conn.request(b"POST", "/json", b"x" * n) for n in (0, 10, 100_000)]
        finally:
            conn.close()
            await asyncio.sleep(0)  # the transport closes its socket in a callback
        return [orjson.loads(r.body)["echo"] for r in replies]

    with serve_app(app) as url:
        assert asyncio.run(go(_port(url))) == [0, 10, 100_000]


def test_connection_closed_by_the_server_while_idle_is_reopened() -> None:
    app = _Counting()

    async def go(port: int) -> list[int]:
        conn = HTTPConnection("127.0.0.1", port)
        try:
            first = await conn.request(b"POST", "/json", b"ab")
            await asyncio.sleep(1.3)  # past the server's keep-alive timeout and the stale limit
            second = await conn.request(b"POST", "/json", b"abc")
        finally:
            conn.close()
            await asyncio.sleep(0)  # the transport closes its socket in a callback
        return [first.status, second.status]

    with serve_app(app, timeout_keep_alive=0.2) as url:
        assert asyncio.run(go(_port(url))) == [200, 200]
    assert app.requests == 2


# --- the bench upstream and tools --------------------------------------------------------------


def test_bench_reply_script() -> None:
    user = {"role": "user", "content": "hello"}
    assert bench_reply({"messages": [user]}).content == "Echo: hello"
    slow = bench_reply({"messages": [{"role": "user", "content": "slow 3 250"}]}, latency_s=0.5)
    assert slow.content == "tick " * 3 and slow.chunk_delay_s == 0.25 and slow.delay_s == 0.5
    tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(4)]
    calls = bench_reply({"messages": [{"role": "user", "content": "please use all tools"}], "tools": tools})
    assert [c["name"] for c in calls.tool_calls] == ["t0", "t1", "t2", "t3"]
    after = bench_reply({"messages": [user, {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]})
    assert after.content == "Tool results: a; b"


def test_bench_upstream_and_tools_serve_through_the_load_generator() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": True})

    async def go(up: int, tools: int) -> tuple[Any, ...]:
        worker = Worker(0)
        try:
            ping = await worker.request("127.0.0.1", up, b"GET", "/ping")
            stream = await worker.request("127.0.0.1", up, b"POST", "/v1/chat/completions", body,
                                          marker=b'"delta":{"content":')  # fmt: skip
            tool = await worker.request("127.0.0.1", tools, b"POST", "/t0", b'{"q":"x"}')
        finally:
            await worker.aclose()
        return ping, stream, tool

    with serve_app(create_bench_upstream()) as up, serve_app(create_tool_app(0.0)) as tools:
        ping, stream, tool = asyncio.run(go(_port(up), _port(tools)))
    assert ping.body == b"pong"
    assert check_chat_stream(stream) is None and stream.t_marker is not None
    assert orjson.loads(tool.body) == {"tool": "/t0", "arguments": {"q": "x"}, "result": "ok"}


# --- scenario 1's floor proxies ----------------------------------------------------------------------


def _post_responses(port: int, text: str) -> Any:
    async def go() -> Any:
        worker = Worker(0)
        try:
            return await worker.request("127.0.0.1", port, b"POST", "/v1/responses",
                                        orjson.dumps({"model": "m", "input": text}))  # fmt: skip
        finally:
            await worker.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("mode", MODES)
def test_floor_proxy_process_answers_a_minimal_completed_response(mode: str, tmp_path: Path) -> None:
    with serve_app(create_bench_upstream()) as up, start_floor_proxy(up + "/v1", tmp_path, mode=mode) as floor:
        reply = _post_responses(floor.port, "hi floor")
    assert reply.status == 200 and check_response(reply) is None
    assert orjson.loads(reply.body) == {
        "id": "resp_floor", "object": "response", "status": "completed",
        "output": [{"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Echo: hi floor"}]}],
    }  # fmt: skip
    assert floor.log.name == f"floor-{mode}.log"


@pytest.mark.parametrize("mode", MODES)
def test_floor_proxy_passes_an_upstream_error_on(mode: str) -> None:
    # No "/v1" on the base URL: the scripted upstream answers /chat/completions with an error.
    with serve_app(create_bench_upstream()) as up, serve_app(create_floor_app(up, mode)) as floor:
        reply = _post_responses(_port(floor), "hi")
    assert reply.status >= 400 and check_response(reply) is not None


def test_create_floor_app_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        create_floor_app("http://127.0.0.1:1/v1", "flask")


def test_scenario_responses_measures_each_floor_against_the_direct_row(tmp_path: Path) -> None:
    # The gateway's place is taken by a floor proxy: this tests the harness, not the gateway.
    sizes = dataclasses.replace(QUICK, responses={1: 6, 4: 12})
    with start_upstream(tmp_path) as up:
        base = up.url + "/v1"
        with (
            start_floor_proxy(base, tmp_path, mode="starlette-httpx") as starlette,
            start_floor_proxy(base, tmp_path, mode="asgi-aiohttp") as asgi,
        ):
            bench = Bench(up, up, starlette, None, tmp_path, sizes, [], floor_starlette=starlette, floor_asgi=asgi)
            rows = asyncio.run(scenario_responses(bench))
    assert [r.id for r in rows] == [
        f"1/{what}/c{c}" for c in (1, 4) for what in ("direct", "gateway", "floor-starlette", "floor-asgi")
    ]
    targets = {target for _, _, _, target in FLOORS}
    for row in rows:
        assert row.errors == 0 and row.requests == sizes.responses[row.concurrency], row.first_error
        if row.id.startswith("1/floor-"):
            direct = next(r for r in rows if r.id == f"1/direct/c{row.concurrency}")
            assert row.target in targets and row.note == "stores nothing, does nothing"
            assert row.added_p50_ms == pytest.approx(row.p50_ms - direct.p50_ms)
            assert row.added_p99_ms == pytest.approx(row.p99_ms - direct.p99_ms)
            assert row.server_cpu_us is not None and row.server_cpu_us >= 0


# --- checks, report and CLI ------------------------------------------------------------------------


def test_check_response_reads_the_top_level_status() -> None:
    from bench.loadgen import HTTPReply

    def reply(body: bytes, status: int = 200) -> HTTPReply:
        return HTTPReply(status, {}, body, 0.0, None, 0.0)

    assert check_response(reply(b'{"id":"resp_1","status":"completed","output":[]}')) is None
    assert "not completed" in (check_response(reply(b'{"id":"resp_1","status":"failed"}')) or "")
    assert "HTTP 500" in (check_response(reply(b"{}", 500)) or "")


def test_reported_turns() -> None:
    from bench.conversation import reported_turns

    assert reported_turns(100) == [1, 10, 50, 100]
    assert reported_turns(30) == [1, 10, 30]


def test_report_table_targets_and_json(tmp_path: Path) -> None:
    rows = [
        Row(id="1/direct/c16", scenario="1 responses", target="direct upstream", concurrency=16,
            requests=10, rps=100.0, p50_ms=1.0, p90_ms=2.0, p99_ms=3.0),
        Row(id="1/gateway/c16", scenario="1 responses", target="stepchain", concurrency=16,
            requests=10, rps=90.0, p50_ms=2.0, p90_ms=3.0, p99_ms=float("nan"),
            added_p50_ms=1.0, added_p99_ms=6.0),
        Row(id="7/gateway", scenario="7 memory", target="stepchain", extra={"kb_per_stream": 80.0}),
    ]  # fmt: skip
    text = render_table(rows)
    assert "stepchain" in text and "1 responses" in text and "7 memory" in text
    assert render_table(rows, markdown=True).count("\n") == len(rows) + 1
    verdicts = {t.name: t.met for t in evaluate_targets(rows, quick=False)}
    assert verdicts["scenario 7: RSS per held stream"] is True
    assert verdicts["scenario 5: added p50 at turn 100"] is None
    assert verdicts["scenario 1, c=16: gateway CPU per response ÷ agentic-api's"] is None  # peer not run
    assert floor_notes(rows, quick=False) == []
    out = tmp_path / "r.json"
    write_json(out, {"rows": rows, "sizes": {16: 3}})
    data = orjson.loads(out.read_bytes())
    assert data["rows"][1]["p99_ms"] is None and data["sizes"] == {"16": 3}


def test_floor_notes_are_informational_not_targets() -> None:
    rows = [
        Row(id="1/gateway/c16", scenario="1 responses", target="stepchain", added_p50_ms=2.0),
        Row(id="1/floor-starlette/c16", scenario="1 responses", target="floor", added_p50_ms=0.75),
        Row(id="1/floor-asgi/c16", scenario="1 responses", target="floor", added_p50_ms=0.25),
    ]
    notes = floor_notes(rows, quick=False)
    assert notes == [
        "scenario 1, c=16: a do-nothing Starlette+httpx proxy adds 0.75 ms p50, "
        "raw ASGI+aiohttp adds 0.25 ms; stepchain adds 2.00 ms"
    ]
    assert render_floor_notes(notes) == "  floor   " + notes[0]
    assert floor_notes(rows, quick=True)[0].endswith("(quick run: indicative)")


def test_issue_15_targets_are_ratios_against_the_floor_and_the_peer() -> None:
    rows = [
        Row(id="1/gateway/c16", scenario="1", target="stepchain", server_cpu_us=300.0, added_p50_ms=2.0, added_p99_ms=9.0),
        Row(id="1/floor-starlette/c16", scenario="1", target="floor", server_cpu_us=250.0),
        Row(id="1/agentic/c16", scenario="1", target="agentic-api", server_cpu_us=280.0, added_p99_ms=20.0),
        Row(id="1/gateway/c1", scenario="1", target="stepchain", added_p50_ms=0.5),
        Row(id="1/agentic/c1", scenario="1", target="agentic-api", added_p50_ms=0.4),
        Row(id="2/ttfd/gateway/c16", scenario="2", target="stepchain", p50_ms=3.0),
        Row(id="2/ttfd/agentic/c16", scenario="2", target="agentic-api", p50_ms=2.5),
        Row(id="3/gateway/c16", scenario="3", target="stepchain", server_cpu_us=600.0),
        Row(id="8/gateway/responses", scenario="8", target="stepchain", extra={"instructions": 1.2e6}),
        Row(id="8/floor-starlette/responses", scenario="8", target="floor", extra={"instructions": 1.0e6}),
        Row(id="9/gateway", scenario="9", target="stepchain",
            extra={"slope_mib_per_min": 0.4, "idle_mib": 50.0, "final_mib": 130.0}),
    ]  # fmt: skip
    verdicts = {t.name: t.met for t in evaluate_targets(rows, quick=False)}
    assert verdicts["scenario 1, c=16: gateway CPU per response ÷ agentic-api's"] is False  # 300 > 280
    assert verdicts["scenario 1, c=16: gateway CPU per response ÷ Starlette floor's"] is True  # 1.2×
    assert verdicts["scenario 8: instructions per response ÷ floor's"] is True
    assert verdicts["scenario 1, c=1: added p50 ÷ agentic-api's"] is False  # 1.25×
    assert verdicts["scenario 2, c=16: time to first delta p50 ÷ agentic-api's"] is False
    assert verdicts["scenario 1, c=16: added p99 ÷ agentic-api's"] is True
    assert verdicts["scenario 3, c=16: gateway CPU per recorded step"] is True  # 600 / 6 steps
    assert verdicts["scenario 9: RSS slope under sustained load"] is True
    assert verdicts["scenario 9: RSS at the end − idle"] is False  # 80 MiB


def test_rss_slope_is_mib_per_minute() -> None:
    from bench.sustained import rss_slope_mib_per_min

    samples = [(t, 100_000 + int(t * 1024 / 60 * 3)) for t in range(0, 600, 10)]  # 3 MiB/min
    assert rss_slope_mib_per_min(samples) == pytest.approx(3.0, rel=1e-3)
    assert rss_slope_mib_per_min([(0.0, 5)]) == 0.0


def test_callgrind_totals_are_read_from_the_last_dump(tmp_path: Path) -> None:
    from bench.instructions import _dumped_total

    (tmp_path / "callgrind.gateway.42.1").write_bytes(b"events: Ir\nsummary: 100\n")
    (tmp_path / "callgrind.gateway.42.2").write_bytes(b"events: Ir\ntotals: 2500\n")
    assert _dumped_total(tmp_path, "gateway", 42) == 2500
    with pytest.raises(RuntimeError):
        _dumped_total(tmp_path, "gateway", 7)


def test_the_upstream_answers_the_same_script_in_the_responses_api() -> None:
    """The bench upstream's Responses mode (for agentic-api) through the real openai SDK."""
    from openai import OpenAI

    from bench.upstream import create_bench_upstream
    from gateway.testing.serving import serve_app

    with serve_app(create_bench_upstream()) as url, OpenAI(base_url=url + "/v1", api_key="unused") as client:
        response = client.responses.create(model="scripted-model", input="hello there")
        assert response.output_text == "Echo: hello there" and response.usage.output_tokens > 0
        with client.responses.stream(model="scripted-model", input=[{"role": "user", "content": "hi"}]) as stream:
            types = [event.type for event in stream]
            assert stream.get_final_response().output_text == "Echo: hi"
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert "response.output_text.delta" in types
        called = client.responses.create(
            model="scripted-model", input="please use all tools",
            tools=[{"type": "function", "name": "t1", "parameters": {"type": "object"}}],
        )  # fmt: skip
        assert [item.type for item in called.output] == ["function_call"]
        assert called.output[0].name == "t1"


def test_main_rejects_an_unknown_scenario_without_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--only", "99"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
