"""HTTP tools against real tool servers on 127.0.0.1 (starlette under uvicorn)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from executors.http_tool import HTTPToolExecutor, ToolError, _host_allowed
from executors.registry import validate_tool_definition
from gateway.testing.serving import serve_app

SECRET = "s3cret-weather-key-0123"
BIG = 1_200_000


async def _echo(request: Request) -> Response:
    """The JSON it received, and a digest of each header (the values themselves stay here)."""
    digests = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in request.headers.items()}
    return JSONResponse({"json": orjson.loads(await request.body()), "headers": digests})


async def _leak(request: Request) -> Response:
    """A careless tool that puts its API key in its answer."""
    return JSONResponse({"key": request.headers.get("x-key"), "ok": True})


async def _leak_error(request: Request) -> Response:
    return PlainTextResponse(f"bad key {request.headers.get('x-key')}", status_code=403)


async def _slow(request: Request) -> Response:
    # Wait for the caller to give up (no fixed sleep: the server shuts down promptly).
    for _ in range(600):
        if await request.is_disconnected():
            break
        await asyncio.sleep(0.05)
    return JSONResponse({"late": True})


async def _drip(request: Request) -> Response:
    async def body() -> Any:
        for _ in range(600):
            yield b" "
            await asyncio.sleep(0.05)

    return StreamingResponse(body(), media_type="application/json")


async def _fail(request: Request) -> Response:
    return PlainTextResponse("boom: the weather service is down", status_code=500)


async def _fail_big(request: Request) -> Response:
    return PlainTextResponse("E" * 100_000, status_code=502)


async def _text(request: Request) -> Response:
    return PlainTextResponse("sunny, 21 °C")


async def _empty(request: Request) -> Response:
    return Response(status_code=204)


async def _list(request: Request) -> Response:
    return JSONResponse([1, 2, 3])


async def _big(request: Request) -> Response:
    return Response(b'"' + b"x" * BIG + b'"', media_type="application/json")


async def _big_stream(request: Request) -> Response:
    async def body() -> Any:
        for _ in range(BIG // 10_000):
            yield b"y" * 10_000

    return StreamingResponse(body(), media_type="text/plain")


async def _cookie(request: Request) -> Response:
    """Sets a cookie and tells which one it was sent (a tool server with a session)."""
    response = JSONResponse({"sent": request.headers.get("cookie")})
    response.set_cookie("session", "abc")
    return response


async def _redirect(request: Request) -> Response:
    return RedirectResponse("/echo", status_code=307)


ROUTES = {
    "/echo": _echo,
    "/leak": _leak,
    "/leak-error": _leak_error,
    "/slow": _slow,
    "/drip": _drip,
    "/fail": _fail,
    "/fail-big": _fail_big,
    "/text": _text,
    "/empty": _empty,
    "/list": _list,
    "/big": _big,
    "/big-stream": _big_stream,
    "/redirect": _redirect,
    "/cookie": _cookie,
}


@pytest.fixture(scope="module")
def tool_server() -> Iterator[str]:
    app = Starlette(routes=[Route(p, h, methods=["POST"]) for p, h in ROUTES.items()])
    with serve_app(app, timeout_graceful_shutdown=2) as url:
        yield url


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}


def tool(url: str, **fields: Any) -> dict[str, Any]:
    return validate_tool_definition({"name": "weather", "url": url, **fields})


def call(
    definition: dict[str, Any], arguments: str, *, environ: dict[str, str] | None = None, **kw: Any
) -> Any:
    async def run() -> Any:
        kw.setdefault("allowed_networks", ("127.0.0.0/8",))
        executor = HTTPToolExecutor(environ=environ or {}, **kw)
        try:
            return await executor.call(definition, arguments)
        finally:
            await executor.aclose()

    return asyncio.run(run())


def call_error(definition: dict[str, Any], arguments: str, **kw: Any) -> ToolError:
    with pytest.raises(ToolError) as info:
        call(definition, arguments, **kw)
    return info.value


# -- success ------------------------------------------------------------------------------------


def test_posts_arguments_as_json_with_resolved_headers(tool_server: str) -> None:
    definition = tool(
        f"{tool_server}/echo",
        parameters=WEATHER_SCHEMA,
        headers={"X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY", "X-Plain": "literal-value"},
    )
    out = call(definition, '{"city": "Köln", "days": 2}', environ={"STEPCHAIN_TOOL_WEATHER_KEY": SECRET})
    assert out["json"] == {"city": "Köln", "days": 2}
    digest = out["headers"]
    assert digest["x-key"] == hashlib.sha256(SECRET.encode()).hexdigest()
    assert digest["x-plain"] == hashlib.sha256(b"literal-value").hexdigest()
    assert digest["content-type"] == hashlib.sha256(b"application/json").hexdigest()


def test_empty_arguments_mean_an_empty_object(tool_server: str) -> None:
    assert call(tool(f"{tool_server}/echo"), "")["json"] == {}


@pytest.mark.parametrize(
    "path, output",
    [
        pytest.param("/text", {"result": "sunny, 21 °C"}, id="non-json-text"),
        pytest.param("/empty", {"result": ""}, id="204-empty"),
        pytest.param("/list", [1, 2, 3], id="json-list"),
    ],
)
def test_2xx_bodies(tool_server: str, path: str, output: Any) -> None:
    assert call(tool(f"{tool_server}{path}"), "{}") == output


def test_echoed_env_secret_is_scrubbed_from_the_output(tool_server: str) -> None:
    definition = tool(f"{tool_server}/leak", headers={"X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY"})
    out = call(definition, "{}", environ={"STEPCHAIN_TOOL_WEATHER_KEY": SECRET})
    assert out == {"key": "***", "ok": True}


def test_shared_client_is_not_closed(tool_server: str) -> None:
    import httpx

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            executor = HTTPToolExecutor(client, allowed_networks=("127.0.0.0/8",))
            await executor.call(tool(f"{tool_server}/list"), "{}")
            await executor.aclose()
            assert not client.is_closed

    asyncio.run(run())


def test_the_direct_path_sends_what_the_client_would(tool_server: str) -> None:
    """Over the transport (as the gateway runs it) a call sends the same headers, body and
    cookies as through ``client.send``, and keeps the cookies a tool sets in the client's jar."""
    import httpx

    definition = tool(
        f"{tool_server}/echo", headers={"X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY", "X-Plain": "v"}
    )
    environ = {"STEPCHAIN_TOOL_WEATHER_KEY": SECRET}

    async def run(direct: bool) -> tuple[Any, Any, Any]:
        transport = httpx.AsyncHTTPTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            executor = HTTPToolExecutor(
                client, transport=transport if direct else None, environ=environ,
                allowed_networks=("127.0.0.0/8",),
            )  # fmt: skip
            echoed = await executor.call(definition, '{"city": "Köln"}', idempotency_key="step_1", call_id="call_1")
            first = await executor.call(tool(f"{tool_server}/cookie"), "{}")
            second = await executor.call(tool(f"{tool_server}/cookie"), "{}")
            return echoed, first, second

    via_client, via_transport = asyncio.run(run(False)), asyncio.run(run(True))
    assert via_transport == via_client
    echoed, first, second = via_transport
    assert echoed["json"] == {"city": "Köln"}
    assert {"x-key", "x-plain", "idempotency-key", "x-stepchain-call-id", "user-agent"} <= set(echoed["headers"])
    assert first == {"sent": None} and second == {"sent": "session=abc"}


# -- failures the model sees --------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, needle",
    [
        pytest.param('{"city": ', "not valid JSON", id="truncated-json"),
        pytest.param("city=Köln", "not valid JSON", id="not-json"),
        pytest.param('{"days": 2}', "'city' is a required property", id="missing-required"),
        pytest.param('{"city": "Köln", "days": "two"}', "$.days", id="wrong-type-names-path"),
        pytest.param('{"city": "Köln", "days": 0}', "$.days", id="below-minimum"),
        pytest.param('{"city": "Köln", "when": "now"}', "'when' was unexpected", id="extra"),
        pytest.param('["Köln"]', "top level", id="not-an-object"),
    ],
)
def test_invalid_arguments(tool_server: str, arguments: str, needle: str) -> None:
    err = call_error(tool(f"{tool_server}/echo", parameters=WEATHER_SCHEMA), arguments)
    assert err.type == "invalid_arguments"
    assert needle in err.message
    assert "'weather'" in err.message


def test_schema_change_replaces_the_cached_validator(tool_server: str) -> None:
    async def run() -> None:
        executor = HTTPToolExecutor(environ={}, allowed_networks=("127.0.0.0/8",))
        try:
            loose = tool(f"{tool_server}/echo")
            assert (await executor.call(loose, '{"days": 2}'))["json"] == {"days": 2}
            strict = tool(f"{tool_server}/echo", parameters=WEATHER_SCHEMA)
            with pytest.raises(ToolError, match="required"):
                await executor.call(strict, '{"days": 2}')
        finally:
            await executor.aclose()

    asyncio.run(run())


def test_500_is_an_http_error_with_a_snippet(tool_server: str) -> None:
    err = call_error(tool(f"{tool_server}/fail"), "{}")
    assert (err.type, err.status) == ("http_error", 500)
    assert "HTTP 500" in err.message
    assert "boom: the weather service is down" in err.message


def test_large_error_body_is_cut_to_a_short_snippet(tool_server: str) -> None:
    err = call_error(tool(f"{tool_server}/fail-big"), "{}")
    assert (err.type, err.status) == ("http_error", 502)
    assert len(err.message) < 1_000


def test_error_snippet_never_holds_the_secret(tool_server: str) -> None:
    definition = tool(f"{tool_server}/leak-error", headers={"X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY"})
    err = call_error(definition, "{}", environ={"STEPCHAIN_TOOL_WEATHER_KEY": SECRET})
    assert err.status == 403
    assert SECRET not in err.message


def test_redirects_are_not_followed(tool_server: str) -> None:
    err = call_error(tool(f"{tool_server}/redirect"), "{}")
    assert (err.type, err.status) == ("http_error", 307)


def test_timeout(tool_server: str) -> None:
    err = call_error(tool(f"{tool_server}/slow", timeout_s=0.3), "{}")
    assert err.type == "timeout"
    assert "0.3 s" in err.message


def test_slow_drip_hits_the_whole_call_timeout(tool_server: str) -> None:
    # Every read arrives within the per-read timeout; only the overall deadline ends it.
    err = call_error(tool(f"{tool_server}/drip", timeout_s=0.3), "{}")
    assert err.type == "timeout"


@pytest.mark.parametrize("path", ["/big", "/big-stream"], ids=["content-length", "streamed"])
def test_oversize_body(tool_server: str, path: str) -> None:
    err = call_error(tool(f"{tool_server}{path}"), "{}", max_response_bytes=1_000_000)
    assert err.type == "response_too_large"
    assert "1000000 bytes" in err.message


def test_big_body_within_the_cap(tool_server: str) -> None:
    out = call(tool(f"{tool_server}/big"), "{}", max_response_bytes=2_000_000)
    assert out == "x" * BIG


def test_connection_refused() -> None:
    # A bound socket that never listens: connecting to it is refused, and the port stays ours.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        err = call_error(tool(f"http://127.0.0.1:{port}/x"), "{}")
    assert err.type == "connection_error"
    assert "'weather'" in err.message
    assert str(port) not in err.message  # tenants and the model see tool names, not URLs


def test_missing_env_variable_names_it_without_values(tool_server: str) -> None:
    definition = tool(f"{tool_server}/echo", headers={"X-Key": "env:STEPCHAIN_TOOL_NOT_SET_KEY", "X-B": "lit"})
    err = call_error(definition, "{}", environ={"OTHER": SECRET})
    assert err.type == "configuration_error"
    assert "STEPCHAIN_TOOL_NOT_SET_KEY" in err.message
    assert SECRET not in err.message and "lit" not in err.message


def test_env_value_with_line_break_is_refused(tool_server: str) -> None:
    definition = tool(f"{tool_server}/echo", headers={"X-Key": "env:STEPCHAIN_TOOL_BAD"})
    err = call_error(definition, "{}", environ={"STEPCHAIN_TOOL_BAD": "abc\r\nX-Evil: 1"})
    assert err.type == "configuration_error"
    assert "abc" not in err.message


# -- where tools may go -------------------------------------------------------------------------


def test_allow_list(tool_server: str) -> None:
    definition = tool(f"{tool_server}/list")
    err = call_error(definition, "{}", allowed_hosts={"api.example.com"})
    assert err.type == "blocked_url"
    assert "'127.0.0.1'" in err.message
    assert call(definition, "{}", allowed_hosts={"api.example.com", "127.0.0.1"}) == [1, 2, 3]


@pytest.mark.parametrize(
    "host, allowed, ok",
    [
        pytest.param("api.example.com", {"api.example.com"}, True, id="exact"),
        pytest.param("API.Example.com.", {"api.example.com"}, True, id="case-and-dot"),
        pytest.param("a.b.example.com", {"*.example.com"}, True, id="wildcard"),
        pytest.param("example.com", {"*.example.com"}, False, id="wildcard-not-apex"),
        pytest.param("evilexample.com", {"*.example.com"}, False, id="wildcard-suffix-only"),
        pytest.param("example.com.evil.net", {"example.com"}, False, id="prefix"),
    ],
)
def test_host_patterns(host: str, allowed: set[str], ok: bool) -> None:
    assert _host_allowed(host, allowed) is ok


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2", "[::1]", "0.0.0.0"])
def test_blocked_port_on_loopback(tool_server: str, host: str) -> None:
    port = int(tool_server.rsplit(":", 1)[1])
    err = call_error(tool(f"http://{host}:{port}/echo"), "{}", blocked_ports={port})
    assert err.type == "blocked_url"
    assert str(port) in err.message


def test_other_ports_are_not_blocked(tool_server: str) -> None:
    port = int(tool_server.rsplit(":", 1)[1])
    assert call(tool(f"{tool_server}/list"), "{}", blocked_ports={port + 1}) == [1, 2, 3]


def test_default_port_is_checked() -> None:
    err = call_error(tool("http://localhost/x"), "{}", blocked_ports={80})
    assert err.type == "blocked_url"


def test_stored_env_header_outside_the_prefix_is_not_read(tool_server: str) -> None:
    # A definition stored before the rule (no validation on the way out of the store).
    definition = {**tool(f"{tool_server}/echo"), "headers": {"X-Key": "env:STEPCHAIN_UPSTREAM_API_KEY"}}
    err = call_error(definition, "{}", environ={"STEPCHAIN_UPSTREAM_API_KEY": "sk-upstream-secret"})
    assert err.type == "configuration_error"
    assert "X-Key" in err.message and "sk-upstream-secret" not in err.message


@pytest.mark.parametrize("gateway_client", [True, False], ids=["gateway-client", "own-client"])
def test_a_cookie_one_tool_call_sets_is_never_sent_on_a_later_call(tool_server: str, gateway_client: bool) -> None:
    """Tool calls are stateless: the gateway's shared tool client (built as gateway/http/app.py
    builds it) and an executor's own client keep no cookie, so one tenant's tool session never
    rides on another tenant's call to the same host."""
    import httpx

    from executors.http_tool import no_cookie_jar

    async def run() -> list[Any]:
        transport = httpx.AsyncHTTPTransport()
        client = httpx.AsyncClient(transport=transport, cookies=no_cookie_jar()) if gateway_client else None
        executor = HTTPToolExecutor(
            client, transport=transport if gateway_client else None, allowed_networks=("127.0.0.0/8",)
        )
        try:
            return [await executor.call(tool(f"{tool_server}/cookie"), "{}") for _ in range(3)]
        finally:
            await executor.aclose()
            if client is not None:
                await client.aclose()

    assert asyncio.run(run()) == [{"sent": None}] * 3
