"""HTTP tools with a fixed latency, in their own process: ``python -m bench.toolserver --port P``.

Every ``POST <any path>`` waits ``--latency-ms`` and answers ``{"tool": <path>, "arguments":
<the JSON body>, "result": "ok"}``; ``GET`` answers ``{"status": "ok"}`` at once (readiness). A plain ASGI app under uvicorn (uvloop,
httptools), so the tools cost as little as possible next to the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import orjson
import uvicorn

__all__ = ["create_tool_app", "main"]

_JSON = [(b"content-type", b"application/json")]


def create_tool_app(latency_s: float) -> Any:
    """The ASGI app described in the module docstring."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            arguments = orjson.loads(b"".join(chunks) or b"null")
        except orjson.JSONDecodeError:
            arguments = None
        if latency_s:
            await asyncio.sleep(latency_s)
        body = orjson.dumps({"tool": scope["path"], "arguments": arguments, "result": "ok"})
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": body})

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.toolserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_tool_app(args.latency_ms / 1000),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
