"""``stepchain demo``: the whole product in one command, with nothing but loopback.

Starts a built-in scripted model (no network, no weights), a sample HTTP tool (``get_weather``)
and the gateway on a temporary SQLite file, each a real uvicorn server on 127.0.0.1; sends one
streamed request through the ``openai`` SDK; prints the text as it streams and then the recorded
step chain.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.http.app import create_app
from gateway.testing.scripted_upstream import (
    Reply,
    ScriptedModel,
    create_scripted_upstream,
)
from gateway.testing.serving import serve_app

from .config import Settings

QUESTION = "What's the weather in Paris and in Oslo?"


def _demo_reply(body: dict[str, Any]) -> Reply:
    """The scripted model: ask for the weather in both cities, then answer from the results."""
    messages = body.get("messages") or []
    tool_results = [m["content"] for m in messages if m.get("role") == "tool"]
    if not tool_results:
        return Reply(
            reasoning="The user wants two cities; I will call get_weather for each, in parallel.",
            tool_calls=[
                {"id": "call_paris", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"id": "call_oslo", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            ],
        )
    return Reply(
        content="Here is the weather: " + "; ".join(tool_results) + ". Enjoy your day!",
        chunk_size=6,
        chunk_delay_s=0.03,
    )


async def _weather(request: Request) -> JSONResponse:
    args = await request.json()
    city = args.get("city", "somewhere")
    forecast = {"Paris": ("sunny", 21), "Oslo": ("light rain", 9)}.get(city, ("cloudy", 15))
    return JSONResponse({"city": city, "sky": forecast[0], "celsius": forecast[1]})


def run_demo(out: TextIO = sys.stdout) -> int:
    """Run the demo, printing to ``out``; returns the exit status (0 on success)."""
    from openai import OpenAI

    model = ScriptedModel(default=_demo_reply)
    tool_app = Starlette(routes=[Route("/weather", _weather, methods=["POST"])])
    with tempfile.TemporaryDirectory(prefix="stepchain-demo-") as tmp, \
            serve_app(create_scripted_upstream(model)) as upstream_url, \
            serve_app(tool_app) as tool_url:
        settings = Settings(
            upstream_base_url=f"{upstream_url}/v1",
            db=str(Path(tmp) / "demo.db"),
            tools=(
                {
                    "name": "get_weather",
                    "description": "Current weather for a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                    "kind": "http",
                    "url": f"{tool_url}/weather",
                    "timeout_s": 10,
                    "allow_private": True,  # the demo tool listens on 127.0.0.1
                },
            ),
        )
        with serve_app(create_app(settings)) as url:
            print(f"gateway   {url}/v1  (SQLite {settings.db})", file=out)
            print(f"upstream  {upstream_url}/v1  (built-in scripted model)", file=out)
            print(f"tool      get_weather -> {tool_url}/weather\n", file=out)
            print(f"> {QUESTION}\n", file=out)
            client = OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0)
            tty = out.isatty()

            def dim(text: str) -> str:  # the model's reasoning, greyed out on a terminal
                return f"\033[2m{text}\033[0m" if tty else text

            final = None
            for event in client.responses.create(model="scripted-model", input=QUESTION, stream=True):
                if event.type == "response.reasoning_text.delta":
                    print(dim(event.delta), end="", file=out, flush=True)
                elif event.type == "response.output_item.added" and event.item.type == "mcp_call":
                    print(f"\n[tool call] {event.item.name} ...", file=out, flush=True)
                elif event.type == "response.output_item.done" and event.item.type == "mcp_call":
                    print(f"[tool done] {event.item.name}({event.item.arguments}) -> {event.item.output}",
                          file=out, flush=True)
                elif event.type == "response.output_text.delta":
                    print(event.delta, end="", file=out, flush=True)
                elif event.type in ("response.completed", "response.failed", "response.incomplete"):
                    final = event.response
            print("\n", file=out)
            if final is None:
                print("the stream ended without a terminal event", file=out)
                return 1
            usage = final.usage
            print(f"response {final.id}: {final.status}, {len(final.output)} output items, "
                  f"{usage.input_tokens} input + {usage.output_tokens} output tokens\n", file=out)
            steps = httpx.get(f"{url}/v1/responses/{final.id}/steps", timeout=10).json()["data"]
            print("step chain (recorded before each step ran, chained by prev_step_id):", file=out)
            for step in steps:
                what = step["request_payload"].get("name") or step["request_payload"].get("model")
                took = (
                    f"{(step['finished_at'] - step['started_at']) * 1000:.1f} ms"
                    if step["finished_at"] and step["started_at"] else "-"
                )
                prev = f"…{step['prev_step_id'][-8:]}" if step["prev_step_id"] else "-"
                print(f"  #{step['sequence']} …{step['id'][-8:]} {step['kind']:<10} {what:<15} "
                      f"{step['state']:<9} {took:>9}  prev={prev}", file=out)
            return 0 if final.status == "completed" else 1
