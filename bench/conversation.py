"""Scenario 5: a ``previous_response_id`` conversation of many turns, at concurrency 1.

Each turn k is measured over turns k−2..k+2 of every conversation, against a baseline that
sends the whole history itself (stepchain: as a chat completion to the upstream; agentic-api:
to the upstream's Responses mode), so the rows show what chaining by id adds as a
conversation grows.
"""

from __future__ import annotations

import asyncio

import orjson

from .loadgen import Worker, summarize
from .processes import ServerProcess
from .report import Row
from .scenarios import LOCALHOST, MODEL, Bench, check_chat, check_response

__all__ = ["reported_turns", "scenario_conversation"]


def reported_turns(turns: int) -> list[int]:
    """Turns 1, 10, 50, 100 that the run reaches, and its last turn."""
    return sorted({t for t in (1, 10, 50, 100) if t <= turns} | {turns})


async def scenario_conversation(b: Bench) -> list[Row]:
    """5: ``previous_response_id`` chains of ``turns`` turns, concurrency 1. Each turn k is
    measured over turns k−2..k+2 of every conversation; the baseline sends the whole history
    (stepchain: as a chat completion; agentic-api: to the upstream's Responses mode)."""
    rows = await _conversation_rows(b, b.gateway, "gateway", "stepchain", responses_mode=False)
    if b.agentic is not None:
        rows += await _conversation_rows(b, b.agentic, "agentic", "agentic-api", responses_mode=True)
    return rows


async def _conversation_rows(
    b: Bench, server: ServerProcess, key: str, name: str, *, responses_mode: bool
) -> list[Row]:
    turns, conversations = b.sizes.turns, b.sizes.conversations
    direct_ms: list[list[float]] = [[] for _ in range(turns)]
    gateway_ms: list[list[float]] = [[] for _ in range(turns)]
    errors: list[str] = []
    worker = Worker(0)
    up_port, gw_port = b.upstream.port, server.port
    direct_path = "/v1/responses" if responses_mode else "/v1/chat/completions"
    try:
        for _ in range(conversations):
            history: list[dict[str, str]] = []
            previous: str | None = None
            for k in range(turns):
                text = f"Turn {k + 1}: tell me one more thing about benchmarks."
                history.append({"role": "user", "content": text})
                direct_body = (
                    {"model": MODEL, "input": history} if responses_mode else {"model": MODEL, "messages": history}
                )
                try:
                    rd = await asyncio.wait_for(worker.request(
                        LOCALHOST, up_port, b"POST", direct_path, orjson.dumps(direct_body),
                    ), 60)  # fmt: skip
                    body = {"model": MODEL, "input": text}
                    if previous:
                        body["previous_response_id"] = previous
                    rg = await asyncio.wait_for(worker.request(
                        LOCALHOST, gw_port, b"POST", "/v1/responses", orjson.dumps(body)
                    ), 60)  # fmt: skip
                except Exception as exc:  # any failure ends this conversation, counted
                    worker.close()
                    errors.append(f"turn {k + 1}: {type(exc).__name__}: {exc}")
                    break
                error = (check_response(rd) if responses_mode else check_chat(rd)) or check_response(rg)
                if error:
                    errors.append(f"turn {k + 1}: {error}")
                    break
                if responses_mode:
                    reply = orjson.loads(rd.body)["output"][0]["content"][0]["text"]
                else:
                    reply = orjson.loads(rd.body)["choices"][0]["message"]["content"]
                history.append({"role": "assistant", "content": reply})
                previous = orjson.loads(rg.body)["id"]
                direct_ms[k].append((rd.t_end - rd.t_start) * 1000)
                gateway_ms[k].append((rg.t_end - rg.t_start) * 1000)
    finally:
        await worker.aclose()
    rows = []
    direct_name = "direct (responses mode)" if responses_mode else "direct"
    for turn in reported_turns(turns):
        window = range(max(turn - 3, 0), min(turn + 2, turns))
        d = summarize([v for k in window for v in direct_ms[k]])
        g = summarize([v for k in window for v in gateway_ms[k]])
        n = sum(len(gateway_ms[k]) for k in window)
        note = f"turns {window.start + 1}-{window.stop} × {conversations} conversations"
        base_key = "direct-responses" if responses_mode else "direct"
        base = Row(
            id=f"5/{base_key}/t{turn}", scenario="5 conversation", target=f"{direct_name}, turn {turn}",
            concurrency=1, requests=n, p50_ms=d["p50"], p90_ms=d["p90"], p99_ms=d["p99"],
            note=note, extra={"turn": turn},
        )  # fmt: skip
        ours = Row(
            id=f"5/{key}/t{turn}", scenario="5 conversation", target=f"{name}, turn {turn}",
            concurrency=1, requests=n, p50_ms=g["p50"], p90_ms=g["p90"], p99_ms=g["p99"],
            added_p50_ms=g["p50"] - d["p50"], added_p99_ms=g["p99"] - d["p99"], note=note,
            extra={"turn": turn},
        )  # fmt: skip
        rows += [base, ours]
    if errors:
        rows[-1].errors = len(errors)
        rows[-1].first_error = errors[0]
    return rows
