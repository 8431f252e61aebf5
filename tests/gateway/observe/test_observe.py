"""Observability end to end on a real gateway running a real tool loop (a parallel HTTP tool and
a sub-agent): the cost stored per model call and summed, Prometheus metrics, OpenTelemetry spans
(the SDK's in-memory exporter) with the client's traceparent carried to the tools, and the
terminal trace of the same database; on SQLite, then on PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.cli import main
from gateway.observe.tracing import disable_tracing_for_tests, reset_tracing_for_tests
from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.gateway.harness import Running, gateway_on, running_gateway

# The module's gateway (``run``) and every test's own run once on SQLite, once on PostgreSQL.
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
PRICES = {MODEL: {"input": 1.0, "output": 2.0}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def run(module_db):
    """One response through the loop; yields (gateway, response id, tool request headers)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    reset_tracing_for_tests()
    seen_headers: list[dict[str, str]] = []
    lock = threading.Lock()

    async def weather(request: Request) -> Response:
        with lock:
            seen_headers.append(dict(request.headers))
        return JSONResponse({"city": (await request.json())["city"], "celsius": 21})

    async def broken(request: Request) -> Response:
        return JSONResponse({"error": "down"}, status_code=503)

    model = ScriptedModel([
        Reply(tool_calls=[
            {"id": "call_w", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "call_r", "name": "researcher", "arguments": '{"input": "Oslo?"}'},
        ]),
        Reply(content="Oslo is mild."),
        Reply(content="Paris 21, Oslo mild."),
        Reply(tool_calls=[{"id": "call_b", "name": "broken", "arguments": "{}"}]),
        Reply(content="The broken tool failed."),
    ])
    try:
        tools = Starlette(routes=[Route("/w", weather, methods=["POST"]),
                                  Route("/b", broken, methods=["POST"])])
        scripted = create_scripted_upstream(model)
        upstream_headers: list[dict[str, str]] = []

        async def upstream(scope, receive, send):  # the scripted model, recording each call's headers
            if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
                upstream_headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
            await scripted(scope, receive, send)

        with serve_app(tools) as tool_url, serve_app(upstream) as upstream_url, gateway_on(
            module_db, f"{upstream_url}/v1", prices=PRICES
        ) as (url, config):
            gw = Running(url, model, upstream_url, module_db, config)
            gw.upstream_headers = upstream_headers
            with gw.http() as http:
                for body in (
                    {"name": "get_weather", "description": "w", "parameters": CITY,
                     "url": f"{tool_url}/w"},
                    {"name": "researcher", "kind": "agent", "description": "r", "model": MODEL,
                     "instructions": "Research.", "tools": []},
                    {"name": "broken", "description": "b", "url": f"{tool_url}/b",
                     "parameters": {"type": "object", "properties": {}}},
                ):
                    assert http.post("/v1/tools", json=body).status_code == 201
            _EXPORTER.clear()
            with gw.http() as http:
                reply = http.post(
                    "/v1/responses", json={"model": MODEL, "input": "Weather?"},
                    headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"},
                )
            assert reply.status_code == 200, reply.text
            assert reply.json()["status"] == "completed"
            with gw.http() as http:  # a failing tool: its span records the error
                failing = http.post(
                    "/v1/responses",
                    json={"model": MODEL, "input": "Use the broken tool",
                          "previous_response_id": reply.json()["id"]},
                )
            assert failing.status_code == 200, failing.text
            gw.failing_id = failing.json()["id"]
            yield gw, reply.json()["id"], seen_headers
    finally:
        disable_tracing_for_tests()


def test_each_model_call_stores_its_cost_and_the_listing_sums_them(run):
    gw, response_id, _ = run
    with gw.http() as http:
        steps = http.get(f"/v1/responses/{response_id}/steps").json()["data"]
        listing = http.get("/v1/stepchain/responses", params={"q": response_id}).json()["data"]
    calls = [s for s in steps if s["kind"] == "model_call"]
    assert len(calls) == 3
    total = 0.0
    for step in calls:
        usage = step["usage"]
        expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
        assert usage["stepchain"]["cost_usd"] == pytest.approx(expected)
        total += expected
    assert listing[0]["cost_usd"] == pytest.approx(total)


def test_metrics_count_the_loop_without_ids(run):
    gw, response_id, _ = run
    with gw.http() as http:
        reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    assert response_id not in text and response_id[5:] not in text and '"call_' not in text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    assert value("stepchain_responses_total", status="completed") >= 1
    assert value("stepchain_steps_total", kind="tool_call", state="completed") >= 2
    assert value("stepchain_steps_total", kind="model_call", state="completed") >= 3
    assert value("stepchain_step_duration_seconds_count", kind="tool_call", tool="get_weather") >= 1
    assert value("stepchain_step_duration_seconds_count", kind="tool_call", tool="researcher") >= 1
    assert value("stepchain_tokens_total", model=MODEL, direction="input") > 0
    assert value("stepchain_tokens_total", model=MODEL, direction="output") > 0
    assert value("stepchain_cost_usd_total", model=MODEL) > 0
    assert value("stepchain_http_request_duration_seconds_count",
                 route="/v1/responses", method="POST", status="200") >= 1
    # The upstream label is the URL, or "other" once 50 upstreams were seen in this process
    # (every test gateway of a test run has its own).
    attempts = sum(
        v for (name, labels), v in samples.items()
        if name == "stepchain_upstream_attempts_total"
        and dict(labels)["upstream"] in (f"{gw.upstream_url}/v1", "other")
        and dict(labels)["status_class"] == "2xx"
    )
    assert attempts >= 3
    assert value("stepchain_loop_iterations_count") >= 1
    assert value("stepchain_store_call_duration_seconds_count", operation="list_steps") >= 1
    assert ("stepchain_responses_in_flight", ()) in samples
    assert ("stepchain_live_streams", ()) in samples


def test_chat_passthrough_steps_are_counted_too(tmp_path):
    """A /v1/chat/completions call is a model-call step like the loop's: counted, tokens, cost."""

    def model_steps(http):
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for sample in family.samples:
                if sample.name == "stepchain_steps_total" and sample.labels == {
                    "kind": "model_call", "state": "completed"
                }:
                    return sample.value
        return 0

    with running_gateway(tmp_path, ScriptedModel([Reply(content="passed through")]), prices=PRICES) as gw:
        with gw.http() as http:
            before = model_steps(http)
            reply = http.post("/v1/chat/completions",
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200, reply.text
            assert model_steps(http) == before + 1


def test_spans_follow_the_genai_conventions_and_nest_the_sub_agent(run):
    gw, response_id, tool_headers = run
    spans = {s.name: s for s in _EXPORTER.get_finished_spans() if s.context.trace_id == int(TRACE_ID, 16)}
    root = spans["invoke_agent stepchain"]
    assert root.parent is not None and root.parent.span_id == int(PARENT, 16)
    assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert root.attributes["gen_ai.response.id"] == response_id
    assert root.attributes["gen_ai.conversation.id"] == response_id
    assert root.attributes["gen_ai.usage.input_tokens"] > 0
    chats = [s for s in _EXPORTER.get_finished_spans()
             if s.name == f"chat {MODEL}" and s.context.trace_id == int(TRACE_ID, 16)]
    assert len(chats) == 3
    for chat in chats:
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.request.model"] == MODEL
        assert chat.attributes["gen_ai.usage.output_tokens"] > 0
        assert chat.attributes["gen_ai.response.finish_reasons"]
        assert "gen_ai.input.messages" not in chat.attributes  # contents only when opted in
    tool = spans["execute_tool get_weather"]
    assert tool.attributes["gen_ai.tool.name"] == "get_weather"
    assert tool.attributes["gen_ai.tool.call.id"] == "call_w"
    assert tool.parent.span_id == root.context.span_id
    agent_tool = spans["execute_tool researcher"]
    agent = spans["invoke_agent researcher"]
    assert agent.parent.span_id == agent_tool.context.span_id
    nested = [c for c in chats if c.parent.span_id == agent.context.span_id]
    assert len(nested) == 1
    # The tool was called with the trace context of its execute_tool span.
    traceparent = tool_headers[-1]["traceparent"]
    assert traceparent.split("-")[1] == TRACE_ID
    assert traceparent.split("-")[2] == format(tool.context.span_id, "016x")
    # Every model call reached the upstream with the trace context of its chat span.
    sent = [h["traceparent"].split("-") for h in gw.upstream_headers if "traceparent" in h]
    chat_ids = {format(c.context.span_id, "016x") for c in chats}
    in_trace = [parts for parts in sent if parts[1] == TRACE_ID]
    assert len(in_trace) == len(chats)
    assert {parts[2] for parts in in_trace} == chat_ids


def test_the_terminal_trace_prints_the_chain_as_a_tree(run, capsys):
    gw, response_id, _ = run
    assert main(["trace", response_id, "--db", str(gw.db)]) == 0
    out = capsys.readouterr().out
    assert response_id in out and "completed" in out
    assert "get_weather" in out and "researcher" in out and "$" in out
    lines = out.splitlines()
    researcher = next(i for i, line in enumerate(lines) if "researcher" in line)
    nested = lines[researcher + 1]
    assert MODEL in nested  # the sub-agent's model call, indented under its tool step
    indent = lambda line: len(line) - len(line.lstrip(" │├└─"))
    assert indent(nested) > indent(lines[researcher])
    assert main(["responses", "--db", str(gw.db)]) == 0
    assert response_id in capsys.readouterr().out


def test_the_terminal_trace_of_an_unknown_id_is_one_line_and_exit_1(run, capsys, tmp_path):
    gw, _response_id, _ = run
    assert main(["trace", "resp_unknown", "--db", str(gw.db)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resp_unknown" in err
    assert main(["responses", "--db", str(tmp_path / "missing.db")]) == 1
    assert capsys.readouterr().err.startswith("stepchain: cannot read the database")


def test_a_failed_tool_span_has_error_type_and_the_chain_is_one_conversation(run):
    gw, response_id, _ = run
    spans = _EXPORTER.get_finished_spans()
    broken = next(s for s in spans if s.name == "execute_tool broken")
    assert broken.attributes["error.type"] == "http_error"
    assert broken.status.status_code.name == "ERROR"
    follow_up = next(
        s for s in spans
        if s.name == "invoke_agent stepchain" and s.attributes["gen_ai.response.id"] == gw.failing_id
    )
    # The conversation id is the first response of the previous_response_id chain.
    assert follow_up.attributes["gen_ai.conversation.id"] == response_id


def test_message_contents_are_recorded_only_when_opted_in(run, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    reset_tracing_for_tests()
    try:
        model = ScriptedModel([Reply(content="captured answer")])
        with running_gateway(tmp_path, model) as gw:
            _EXPORTER.clear()
            with gw.http() as http:
                reply = http.post("/v1/responses", json={"model": MODEL, "input": "secret question"})
            assert reply.status_code == 200, reply.text
    finally:
        disable_tracing_for_tests()
    chat = next(s for s in _EXPORTER.get_finished_spans() if s.name == f"chat {MODEL}")
    assert "secret question" in chat.attributes["gen_ai.input.messages"]
    assert "captured answer" in chat.attributes["gen_ai.output.messages"]
