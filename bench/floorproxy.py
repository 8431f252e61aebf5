"""Scenario 1's floor, in its own process: a do-nothing ``/v1/responses`` proxy,
``python -m bench.floorproxy --port P --upstream-base-url URL --mode MODE``.

It shows what the web stack alone adds to a request, so the gateway's added latency can be
split into "the stack" and "stepchain's logic". ``POST /v1/responses`` reads the JSON body
(``{"model", "input": "<text>"}``), sends ``{"model", "messages": [{"role": "user", "content":
input}]}`` to ``<URL>/chat/completions``, and answers a minimal completed Response object
(``resp_floor``, one ``output_text``) built from the completion's first message. It stores
nothing and validates nothing; an upstream status other than 200 is passed on with its body.
``GET /healthz`` answers 200 (readiness).

Modes (``--mode``):

* ``starlette-httpx``: a Starlette app; the upstream is called through
  ``httpx_aiohttp.AiohttpTransport`` directly (``handle_async_request``), as the gateway does:
  the gateway's own libraries, none of its logic.
* ``asgi-aiohttp``: a raw ASGI callable (no framework) and one shared ``aiohttp.ClientSession``:
  the leanest stack Python offers here.

Both run under uvicorn with uvloop and httptools, no access log, and the gateway's upstream
connection limit (2,000).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import uvicorn

__all__ = ["MODES", "create_floor_app", "main", "response_body"]

MODES = ("starlette-httpx", "asgi-aiohttp")
_MAX_CONNECTIONS = 2000  # as the gateway's upstream client
_JSON = "application/json"
_JSON_HEADERS = [(b"content-type", b"application/json")]


def chat_body(body: bytes) -> bytes:
    """The chat request for a ``{"model", "input"}`` Responses request body."""
    request = orjson.loads(body)
    return orjson.dumps({"model": request["model"], "messages": [{"role": "user", "content": request["input"]}]})


def response_body(completion: bytes) -> bytes:
    """The minimal completed Response object for a chat completion body (compact JSON)."""
    text = orjson.loads(completion)["choices"][0]["message"]["content"]
    return orjson.dumps({
        "id": "resp_floor", "object": "response", "status": "completed",
        "output": [{"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": text}]}],
    })  # fmt: skip


def _starlette_httpx(chat_url: str) -> Any:
    import httpx
    from httpx_aiohttp import AiohttpTransport
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    limits = httpx.Limits(max_connections=_MAX_CONNECTIONS, max_keepalive_connections=500)
    transport = AiohttpTransport(limits=limits)  # its aiohttp session is created on first use
    url = httpx.URL(chat_url)
    headers = {"Content-Type": _JSON}

    async def responses(request: Request) -> Response:
        upstream_request = httpx.Request("POST", url, content=chat_body(await request.body()), headers=headers)
        upstream = await transport.handle_async_request(upstream_request)
        try:
            body = await upstream.aread()
        finally:
            await upstream.aclose()
        if upstream.status_code != 200:
            return Response(body, status_code=upstream.status_code, media_type=_JSON)
        return Response(response_body(body), media_type=_JSON)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await transport.aclose()

    return Starlette(
        routes=[Route("/v1/responses", responses, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )


def _asgi_aiohttp(chat_url: str) -> Any:
    import aiohttp

    session: aiohttp.ClientSession | None = None
    headers = {"Content-Type": _JSON}

    def open_session() -> aiohttp.ClientSession:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS), timeout=aiohttp.ClientTimeout(total=None)
            )
        return session

    async def send_json(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def lifespan(receive: Any, send: Any) -> None:
        nonlocal session
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                open_session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if session is not None:
                    await session.close()
                    session = None
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await send_json(send, 200, b'{"status":"ok"}')
            return
        if scope["path"] != "/v1/responses" or scope["method"] != "POST":
            await send_json(send, 404, b'{"error":"not found"}')
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        payload = chat_body(b"".join(chunks))
        async with open_session().post(chat_url, data=payload, headers=headers) as upstream:
            body = await upstream.read()
            status = upstream.status
        await send_json(send, status, body if status != 200 else response_body(body))

    return app


def create_floor_app(upstream_base_url: str, mode: str) -> Any:
    """The ASGI app of ``mode`` (one of :data:`MODES`) for a Chat Completions base URL."""
    chat_url = upstream_base_url.rstrip("/") + "/chat/completions"
    if mode == "starlette-httpx":
        return _starlette_httpx(chat_url)
    if mode == "asgi-aiohttp":
        return _asgi_aiohttp(chat_url)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floorproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-base-url", required=True, help="Chat Completions base, e.g. http://h:p/v1")
    parser.add_argument("--mode", choices=MODES, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_floor_app(args.upstream_base_url, args.mode),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
