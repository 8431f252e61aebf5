"""Safe by default, against real servers on loopback: which secrets reach which server, what
tenants see of URLs, the per-response step cap, the gateway's own socket, and `serve --host`.
The tests that store tools, responses and steps run on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.gateway.harness import ROOT, fresh_db, gateway_on, running_gateway

MODEL = "scripted-model"
ADMIN = "admin-key-hardening"
CLIENT_KEY = "sk-client-own-key-1"


def _digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()


class EchoTool:
    """An HTTP tool that answers with digests of the headers it received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

        async def echo(request: Request) -> JSONResponse:
            self.seen.append(dict(request.headers))
            return JSONResponse({"x-key": _digest(request.headers.get("x-key"))})

        self.app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])


@pytest.mark.usefixtures("on_both_backends")
def test_env_headers_come_only_from_the_tool_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPCHAIN_TOOL_ECHO_KEY", "tool-secret-value-1")
    monkeypatch.setenv("STEPCHAIN_UPSTREAM_API_KEY", "sk-upstream-must-stay-home")
    echo = EchoTool()
    model = ScriptedModel(default=lambda body: Reply(content="done"))
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "echo", "arguments": "{}"}]))
    with serve_app(echo.app) as tool_url, running_gateway(tmp_path, model, admin_key=ADMIN) as gw:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with gw.http() as http:
            refused = http.post("/v1/tools", headers=admin, json={
                "name": "echo", "url": f"{tool_url}/echo",
                "headers": {"X-Key": "env:STEPCHAIN_UPSTREAM_API_KEY"},
            })
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["param"] == "headers.X-Key" and "STEPCHAIN_TOOL_" in error["message"]
            assert http.post("/v1/tools", headers=admin, json={
                "name": "echo", "url": f"{tool_url}/echo",
                "headers": {"X-Key": "env:STEPCHAIN_TOOL_ECHO_KEY"},
            }).status_code == 201
        response = gw.client().responses.create(model=MODEL, input="echo")
    call = next(i for i in response.output if i.type == "mcp_call")
    assert call.output == f'{{"x-key":"{_digest("tool-secret-value-1")}"}}'
    assert len(echo.seen) == 1
    assert "sk-upstream-must-stay-home" not in str(echo.seen)


class KeyRecorder:
    """An upstream that records the Authorization header of every request; ``fail`` answers 500."""

    def __init__(self, *, fail: bool) -> None:
        self.keys: list[str | None] = []
        self.fail = fail
        self.inner = create_scripted_upstream(ScriptedModel(default=lambda b: Reply(content="hi")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            auth = dict(scope["headers"]).get(b"authorization")
            self.keys.append(auth.decode() if auth else None)
            if self.fail:
                body = b'{"error": {"message": "down", "type": "server_error"}}'
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.inner(scope, receive, send)


@pytest.mark.usefixtures("on_both_backends")
@pytest.mark.parametrize("marked", [False, True], ids=["fallback-unmarked", "fallback-marked"])
def test_client_key_goes_only_where_it_was_meant(tmp_path, marked):
    primary, fallback = KeyRecorder(fail=True), KeyRecorder(fail=False)
    with serve_app(primary) as primary_url, serve_app(fallback) as fallback_url:
        table = {"base_url": f"{fallback_url}/v1", "api_key": "sk-fallback-own",
                 "pass_client_key": marked}
        with gateway_on(fresh_db(tmp_path), f"{primary_url}/v1", api_keys=CLIENT_KEY,
                        pass_client_key=True, upstream_api_key="sk-gateway-primary",
                        upstream_max_retries=0, upstream_fallbacks=[table]) as (url, _):
            with openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
                response = client.responses.create(model=MODEL, input="hello")
    assert response.status == "completed"
    assert primary.keys == [f"Bearer {CLIENT_KEY}"]
    assert fallback.keys == [f"Bearer {CLIENT_KEY}" if marked else "Bearer sk-fallback-own"]


@pytest.mark.usefixtures("on_both_backends")
def test_steps_show_urls_to_the_admin_only(tmp_path):
    primary, fallback = KeyRecorder(fail=True), KeyRecorder(fail=False)
    with serve_app(primary) as primary_url, serve_app(fallback) as fallback_url:
        table = {"base_url": f"{fallback_url}/v1"}
        with gateway_on(fresh_db(tmp_path), f"{primary_url}/v1", api_keys=CLIENT_KEY,
                        admin_key=ADMIN, upstream_max_retries=0,
                        upstream_fallbacks=[table]) as (url, _):
            with openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
                response = client.responses.create(model=MODEL, input="hello")
                path = f"{url}/v1/responses/{response.id}/steps"
                tenant = httpx.get(path, headers={"Authorization": f"Bearer {CLIENT_KEY}"}).json()
                admin = httpx.get(path, headers={"Authorization": f"Bearer {ADMIN}"}).json()
    tenant_step, admin_step = tenant["data"][0], admin["data"][0]
    assert admin_step["upstream"] == f"{fallback_url}/v1"
    assert tenant_step["upstream"] == "fallback-1"
    assert "127.0.0.1" not in str(tenant)


@pytest.mark.usefixtures("on_both_backends")
def test_steps_per_response_are_capped_across_scopes(tmp_path):
    def always_tools(body: dict[str, Any]) -> Reply:
        return Reply(tool_calls=[{"id": f"c{len(body['messages'])}", "name": "nope", "arguments": "{}"}])

    model = ScriptedModel(default=always_tools)
    with running_gateway(tmp_path, model, max_response_steps=5, max_response_iterations=50) as gw:
        response = gw.client().responses.create(model=MODEL, input="loop")
        with gw.http() as http:
            steps = http.get(f"/v1/responses/{response.id}/steps").json()["data"]
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_steps_exceeded"
    assert len(steps) == 5


def test_the_gateways_own_port_is_refused_whatever_the_name(tmp_path):
    model = ScriptedModel(default=lambda body: Reply(content="done"))
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "self_call", "arguments": "{}"}]))
    with running_gateway(tmp_path, model, tool_allowed_networks="0.0.0.0/0,::/0") as gw:
        port = gw.url.rsplit(":", 1)[1]
        with gw.http() as http:
            created = http.post("/v1/tools", json={
                "name": "self_call", "url": f"http://localhost:{port}/v1/responses",
                "allow_private": True,
            })
            assert created.status_code == 201, created.text
        response = gw.client().responses.create(model=MODEL, input="call yourself")
    call = next(i for i in response.output if i.type == "mcp_call")
    assert call.status == "failed" and "own address" in str(call.error)


def test_serve_on_a_network_address_needs_keys(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--host", "0.0.0.0",
         "--upstream-base-url", "http://127.0.0.1:9/v1", "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "STEPCHAIN_API_KEYS" in lines[0] and "--insecure-open" in lines[0]


@pytest.mark.usefixtures("on_both_backends")
def test_registered_tool_on_loopback_needs_allow_private(tmp_path):
    echo = EchoTool()
    model = ScriptedModel(default=lambda body: Reply(content="done"))
    model.replies.append(Reply(tool_calls=[{"id": "c1", "name": "echo", "arguments": "{}"}]))
    model.replies.append(Reply(content="first done"))
    model.replies.append(Reply(tool_calls=[{"id": "c2", "name": "echo2", "arguments": "{}"}]))
    with serve_app(echo.app) as tool_url, \
            running_gateway(tmp_path, model, tool_allowed_networks=None) as gw:
        with gw.http() as http:
            for name, extra in (("echo", {}), ("echo2", {"allow_private": True})):
                body = {"name": name, "url": f"{tool_url}/echo", **extra}
                assert http.post("/v1/tools", json=body).status_code == 201
        client = gw.client()
        refused = client.responses.create(model=MODEL, input="call echo")
        allowed = client.responses.create(model=MODEL, input="call echo2")
    call = next(i for i in refused.output if i.type == "mcp_call")
    assert call.status == "failed" and "loopback" in str(call.error)
    call = next(i for i in allowed.output if i.type == "mcp_call")
    assert call.status == "completed"
    assert len(echo.seen) == 1
