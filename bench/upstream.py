"""The benchmark's scripted upstream, in its own process: ``python -m bench.upstream --port P``.

It is :func:`gateway.testing.scripted_upstream.create_scripted_upstream` with the benchmark script
:func:`bench_reply`, no request recording, and three extra routes: ``GET /ping`` (a 4-byte answer
straight from ASGI, the load generator's trivial endpoint), ``GET /health`` (the readiness probe
vLLM serves, which peers poll) and ``POST /v1/responses`` (the same script in the Responses API,
:mod:`bench.responses_upstream`, for peers that forward to a Responses upstream). Served by uvicorn with uvloop and
httptools when installed.

Options: ``--port`` (required), ``--host`` (127.0.0.1), ``--latency-ms`` (added before every
chat completion answer, default 0).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn

from gateway.testing.scripted_upstream import (
    Reply,
    ScriptedModel,
    create_scripted_upstream,
)

from .responses_upstream import ResponsesMode

__all__ = ["SLOW_PREFIX", "TOOLS_PHRASE", "bench_reply", "create_bench_upstream", "main"]

# A user text "slow <chunks> <interval_ms>" asks for a slow stream: <chunks> content pieces,
# <interval_ms> apart (the memory scenario's held streams).
SLOW_PREFIX = "slow "
# A user text containing this phrase, with tools offered, calls every offered tool at once.
TOOLS_PHRASE = "use all tools"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def bench_reply(body: dict[str, Any], latency_s: float = 0.0) -> Reply:
    """The benchmark script. After ``tool`` messages: ``"Tool results: "`` + their outputs.
    A last user text ``"slow N MS"``: a stream of N pieces ``MS`` ms apart. With
    :data:`TOOLS_PHRASE` and tools offered: one call to each offered tool, ``{"q": "bench"}``.
    Otherwise ``"Echo: <last user text>"``. Every reply waits ``latency_s`` first."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        outputs = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            outputs.append(_text(message.get("content")))
        return Reply(content="Tool results: " + "; ".join(reversed(outputs)), delay_s=latency_s)
    text = _text(last.get("content")) if last.get("role") == "user" else ""
    if text.startswith(SLOW_PREFIX):
        _, chunks, interval_ms = text.split()
        return Reply(
            content="tick " * int(chunks),
            chunk_size=5,
            chunk_delay_s=int(interval_ms) / 1000,
            delay_s=latency_s,
        )
    tools = body.get("tools")
    if tools and TOOLS_PHRASE in text:
        calls = [
            {"id": f"call_bench{i:04d}", "name": t["function"]["name"], "arguments": '{"q":"bench"}'}
            for i, t in enumerate(tools)
        ]
        return Reply(tool_calls=calls, delay_s=latency_s)
    return Reply(content="Echo: " + text, delay_s=latency_s)


_PONG_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"4")],
}
_PONG_BODY = {"type": "http.response.body", "body": b"pong"}


def create_bench_upstream(latency_s: float = 0.0) -> Any:
    """The ASGI app: ``GET /ping``, ``GET /health`` and ``POST /v1/responses`` here, everything
    else to the scripted upstream (both API modes answer from one script)."""
    model = ScriptedModel(default=lambda body: bench_reply(body, latency_s), record=False)
    scripted = create_scripted_upstream(model)
    responses = ResponsesMode(model)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/ping" or path == "/health":
                await send(_PONG_START)
                await send(_PONG_BODY)
                return
            if path == "/v1/responses" and scope["method"] == "POST":
                await responses(scope, receive, send)
                return
        await scripted(scope, receive, send)

    return app


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    uvicorn.run(
        create_bench_upstream(args.latency_ms / 1000),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
