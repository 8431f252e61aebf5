"""A real ``stepchain serve`` process: ``--log-format json`` writes one JSON object per line for
each response, step, upstream retry and error, with ids, tenant and timings and no secret; with
``--workers 2`` ``/metrics`` sums both workers (prometheus-client's multiprocess mode). SQLite
only: neither depends on the store (two workers on PostgreSQL: tests/gateway/test_cli.py)."""

from __future__ import annotations

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.gateway.harness import serve_process

MODEL = "scripted-model"
KEY = "sk-tenant-logs-0123456789"
ADMIN = "sk-admin-logs-5555"
UPSTREAM_KEY = "sk-upstream-secret-777"
TOOL_SECRET = "tool-header-secret-4242"


def _lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def test_json_logs_carry_ids_tenant_and_timings_and_no_secret(tmp_path):
    async def echo(request):
        from starlette.responses import JSONResponse

        return JSONResponse({"ok": True})

    from starlette.applications import Starlette
    from starlette.routing import Route

    model = ScriptedModel([
        Reply(status=500),
        Reply(tool_calls=[{"id": "call_1", "name": "echo", "arguments": "{}"}]),
        Reply(content="all done"),
        Reply(status=400),
    ])
    log = tmp_path / "gateway.log"
    with serve_app(create_scripted_upstream(model)) as upstream, \
            serve_app(Starlette(routes=[Route("/echo", echo, methods=["POST"])])) as tool_url:
        env = {
            "STEPCHAIN_UPSTREAM_BASE_URL": f"{upstream}/v1",
            "STEPCHAIN_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "STEPCHAIN_DB": str(tmp_path / "db.sqlite"),
            "STEPCHAIN_API_KEYS": KEY,
            "STEPCHAIN_ADMIN_KEY": ADMIN,
            "STEPCHAIN_TOOL_SECRET": TOOL_SECRET,
        }
        with serve_process(["--log-format", "json"], log, env=env) as (url, _proc):
            with httpx.Client(base_url=url, timeout=60) as http:
                tool = {"name": "echo", "description": "e", "url": f"{tool_url}/echo",
                        "headers": {"X-Secret": "env:STEPCHAIN_TOOL_SECRET"},
                        "parameters": {"type": "object", "properties": {}}}
                assert http.post("/v1/tools", json=tool,
                                 headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 201
                auth = {"Authorization": f"Bearer {KEY}"}
                ok = http.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=auth)
                assert ok.status_code == 200, ok.text
                bad = http.post("/v1/responses", json={"model": MODEL, "input": "no"}, headers=auth)
                assert bad.status_code >= 400
    text = log.read_text()
    for secret in (KEY, ADMIN, UPSTREAM_KEY, TOOL_SECRET):
        assert secret not in text
    lines = _lines(text)  # every line is one JSON object
    events = [line for line in lines if "event" in line]
    rid = ok.json()["id"]
    mine = [e for e in events if e.get("response_id") == rid]
    kinds = [e["event"] for e in mine]
    assert kinds[0] == "response.started" and kinds[-1] == "response.finished"
    assert kinds.count("step.finished") == 3 and "upstream.retry" in kinds
    for event in mine:
        assert event["tenant"].startswith("tenant_")
        assert event["ts"].endswith("Z") and event["level"] in ("info", "warning")
    steps = [e for e in mine if e["event"] == "step.finished"]
    assert {e["kind"] for e in steps} == {"model_call", "tool_call"}
    assert all(e["step_id"].startswith("step_") and e["duration_ms"] >= 0 for e in steps)
    assert any(e["step_name"] == "echo" and e["state"] == "completed" for e in steps)
    retry = next(e for e in mine if e["event"] == "upstream.retry")
    assert retry["status"] == 500 and retry["step_id"].startswith("step_")
    finished = mine[-1]
    assert finished["status"] == "completed" and finished["duration_ms"] > 0
    assert finished["iterations"] == 3 and finished["input_tokens"] > 0
    assert any(e["event"] == "error" and e.get("response_id") != rid for e in events)


def test_metrics_with_two_workers_sum_both(tmp_path):
    model = ScriptedModel(default=lambda body: Reply(content="hello"))
    with serve_app(create_scripted_upstream(model)) as upstream:
        env = {"STEPCHAIN_UPSTREAM_BASE_URL": f"{upstream}/v1",
               "STEPCHAIN_DB": str(tmp_path / "db.sqlite"), "PROMETHEUS_MULTIPROC_DIR": ""}
        multiproc = tmp_path / "prom"
        multiproc.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        with serve_process(["--workers", "2"], tmp_path / "gateway.log", env=env) as (url, _proc):
            count = 12
            for _ in range(count):
                # A new connection each time: the kernel spreads them over both workers.
                reply = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "hi"},
                                   timeout=60)
                assert reply.status_code == 200, reply.text
            text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stepchain_responses_total" and sample.labels == {"status": "completed"}:
                total += sample.value
    assert total == count  # whichever worker answered /metrics, both workers' counts are in it
    assert len(list(multiproc.glob("*.db"))) >= 2
