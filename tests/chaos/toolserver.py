"""The chaos test's HTTP tool server: logs every call, honours ``Idempotency-Key``.

``python -m tests.chaos.toolserver --port P --log FILE [--latency-ms MS]``. Every ``POST /<tool>``
appends one JSON line to ``FILE`` (flushed before the answer is sent)::

    {"t": <unix s>, "tool": "<tool>", "idempotency_key": <header or null>,
     "call_id": <call id header or null>, "arguments": <body>, "executed": true|false}

A request whose ``Idempotency-Key`` was seen before is not executed again (``executed: false``):
it waits for the first one and gets the same answer, as an idempotent payment API does. Without
the header every request is an execution. ``GET`` answers ``{"status": "ok"}`` (readiness). The
test reads the log: a non-idempotent tool call executed twice is a bug (:func:`read_log`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import uvicorn

__all__ = ["CALL_ID_HEADERS", "create_tool_app", "main", "read_log"]

_JSON = [(b"content-type", b"application/json")]
# Header names under which a gateway may send the model's call_id (the first present is logged).
CALL_ID_HEADERS = (b"x-stepchain-call-id", b"x-call-id", b"openai-call-id", b"x-tool-call-id")


def create_tool_app(log_path: Path, latency_s: float) -> Any:
    """The ASGI app described in the module docstring."""
    log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
    answers: dict[str, asyncio.Future[bytes]] = {}

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
        headers = dict(scope["headers"])
        key = headers.get(b"idempotency-key")
        call_id = next((headers[h] for h in CALL_ID_HEADERS if h in headers), None)
        tool = scope["path"].lstrip("/")
        first = key is None or key not in answers
        entry = {
            "t": time.time(), "tool": tool,
            "idempotency_key": key.decode() if key else None,
            "call_id": call_id.decode() if call_id else None,
            "arguments": arguments, "executed": first,
        }  # fmt: skip
        log.write(orjson.dumps(entry) + b"\n")
        if first:
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            if key is not None:
                answers[key] = future
            if latency_s:
                await asyncio.sleep(latency_s)
            body = orjson.dumps({"tool": tool, "arguments": arguments, "result": f"ok {tool}"})
            future.set_result(body)
        else:
            body = await answers[key]  # type: ignore[index]
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": body})

    return app


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """The log's entries, in order (a torn last line is skipped)."""
    out = []
    for line in log_path.read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.toolserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    args = parser.parse_args(argv)
    uvicorn.run(create_tool_app(args.log, args.latency_ms / 1000), host=args.host, port=args.port,
                log_level="warning", access_log=False, lifespan="off")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
