"""The chaos test's scripted upstream, in its own process: ``python -m tests.chaos.upstream --port P``.

A :class:`gateway.testing.scripted_upstream.ScriptedModel` (no recording) with one script,
:func:`chaos_reply`, so every replica of the gateway, and every re-run of a model call after a
take-over, gets the same answer to the same messages. The first user message reads
``chaos <token> rounds=<R> pieces=<P> piece_ms=<MS>``; tools offered are called all at once,
``R`` times, each round with a short streamed text first, then a final text of ``P`` pieces
``MS`` ms apart. Tool call ids are ``call_<token>_<round>_<i>`` and the arguments
``{"q": "<token>/<round>/<i>"}``, so the tool server's log tells which response asked for each call.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn

from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream

__all__ = ["chaos_prompt", "chaos_reply", "main"]

_PROMPT = re.compile(r"chaos (\S+) rounds=(\d+) pieces=(\d+) piece_ms=(\d+)")


def chaos_prompt(token: str, *, rounds: int, pieces: int, piece_ms: int) -> str:
    """The user input that makes :func:`chaos_reply` run ``rounds`` tool rounds for ``token``."""
    return f"chaos {token} rounds={rounds} pieces={pieces} piece_ms={piece_ms}"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def chaos_reply(body: dict[str, Any]) -> Reply:
    """The script (see the module docstring); anything else is answered ``"Echo: <text>"``."""
    messages = body.get("messages") or []
    first_user = next((m for m in messages if m.get("role") == "user"), {})
    match = _PROMPT.search(_text(first_user.get("content")))
    if match is None:
        last = messages[-1] if messages else {}
        return Reply(content="Echo: " + _text(last.get("content")))
    token, rounds, pieces, piece_ms = match[1], int(match[2]), int(match[3]), int(match[4])
    done = sum(1 for m in messages if m.get("role") == "assistant" and m.get("tool_calls"))
    tools = [t["function"]["name"] for t in body.get("tools") or [] if t.get("type") == "function"]
    delay = piece_ms / 1000
    if done < rounds and tools:
        calls = [
            {"id": f"call_{token}_{done}_{i}", "name": name, "arguments": f'{{"q":"{token}/{done}/{i}"}}'}
            for i, name in enumerate(tools)
        ]
        return Reply(content=f"Round {done} for {token}: calling tools. ", tool_calls=calls,
                     chunk_size=6, chunk_delay_s=delay)  # fmt: skip
    words = " ".join(f"w{k}" for k in range(pieces))
    return Reply(content=f"Done {token}: {words}.", chunk_size=max(1, len(words) // max(pieces, 1)),
                 chunk_delay_s=delay)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    model = ScriptedModel(default=chaos_reply, record=False)
    app = create_scripted_upstream(model)

    async def with_ping(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/ping":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"pong"})
            return
        await app(scope, receive, send)

    uvicorn.run(with_ping, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
