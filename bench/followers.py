"""How late a stream's events reach its own client and a follower on another replica (issue 11:
"followers on another replica get new events within ~50 ms").

``python -m bench.followers`` starts a timestamping upstream and two gateways on one database
(``--backend sqlite``: one SQLite file, ``postgresql``: a throwaway PostgreSQL server, ``both``:
one then the other). For each of ``--runs`` streamed responses it posts the request to replica
A, and as soon as A's client has ``response.created`` it follows the response on replica B
(``GET /v1/responses/{id}?stream=true&starting_after=0``). The upstream writes its send time
(``time.time()``, seconds) as each delta's text, so the lag of a delta is its arrival at a
client minus that time, free of the upstream's pacing drift; all processes share one clock.

It prints, per backend, the lag of A's client (the stored-first stream: at most about
``stream_flush_s`` after the delta arrived) and of B's follower (that plus B's wake-up: a
NOTIFY on PostgreSQL, SQLite's poll), p50 / p99 / max in milliseconds, leaving out the first
``SKIPPED`` deltas of each run (B attaches meanwhile). Lags, never a pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench import processes
from bench.postgres import PostgresUnavailable, start_postgres
from gateway.testing.serving import serve_app

__all__ = ["main", "timestamping_upstream"]

SKIPPED = 3  # deltas of each run left out: the follower attaches while they stream
_DELTA = b"event: response.output_text.delta"
_CREATED = b"event: response.created"


def timestamping_upstream(deltas: int, interval_s: float) -> Starlette:
    """A Chat Completions upstream whose every streamed reply is ``deltas`` content deltas
    ``interval_s`` apart, each one's text its send time (``time.time()`` as ``"%.6f "``)."""
    base = {"id": "chatcmpl-followers", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    async def completions(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for _ in range(deltas):
                yield chunk({"content": f"{time.time():.6f} "})
                await asyncio.sleep(interval_s)
            yield chunk({}, "stop")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def _read(reply: httpx.Response, lags_ms: list[float], on_created: Callable[[str], None] | None = None) -> None:
    """Each delta's lag (arrival − the send time it carries), in ms, into ``lags_ms``."""
    buffer = b""
    for data in reply.iter_bytes():
        now = time.time()
        buffer += data
        *frames, buffer = buffer.split(b"\n\n")
        for frame in frames:
            if frame.startswith(_DELTA):
                sent = float(orjson.loads(frame.split(b"data: ", 1)[1])["delta"])
                lags_ms.append((now - sent) * 1000)
            elif on_created is not None and frame.startswith(_CREATED):
                on_created(orjson.loads(frame.split(b"data: ", 1)[1])["response"]["id"])


def _one_run(url_a: str, url_b: str, deltas: int) -> tuple[list[float], list[float]]:
    own: list[float] = []
    followed: list[float] = []
    threads: list[threading.Thread] = []

    def follow(response_id: str) -> None:
        def run() -> None:
            with httpx.stream(
                "GET", f"{url_b}/v1/responses/{response_id}",
                params={"stream": "true", "starting_after": "0"}, timeout=120,
            ) as reply:  # fmt: skip
                reply.raise_for_status()
                _read(reply, followed)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    body = {"model": "m", "input": "go", "stream": True}
    with httpx.stream("POST", f"{url_a}/v1/responses", json=body, timeout=120) as reply:
        reply.raise_for_status()
        _read(reply, own, follow)
    for thread in threads:
        thread.join(120)
    if len(own) != deltas or len(followed) != deltas:
        raise RuntimeError(f"expected {deltas} deltas, got {len(own)} at A and {len(followed)} at B")
    return own[SKIPPED:], followed[SKIPPED:]


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(lags_ms: Sequence[float]) -> str:
    return (f"p50 {_quantile(lags_ms, 0.5):.1f}  p99 {_quantile(lags_ms, 0.99):.1f}"
            f"  max {max(lags_ms):.1f} ms")  # fmt: skip


@contextlib.contextmanager
def _database(backend: str, log_dir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield str(log_dir / "shared.db")
        return
    with start_postgres() as pg:
        yield pg.new_database()


def measure(backend: str, upstream_url: str, log_dir: Path, *, deltas: int, runs: int) -> tuple[list[float], list[float]]:
    """Lags (ms) of A's client and of B's follower over ``runs`` streams on ``backend``."""
    own: list[float] = []
    followed: list[float] = []
    with _database(backend, log_dir) as db:
        a = processes.start_gateway(upstream_url, log_dir, name=f"{backend}-a", db=db)
        try:
            b = processes.start_gateway(upstream_url, log_dir, name=f"{backend}-b", db=db)
            try:
                url_a, url_b = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}"
                for _ in range(runs):
                    mine, theirs = _one_run(url_a, url_b, deltas)
                    own += mine
                    followed += theirs
            finally:
                b.stop()
        finally:
            a.stop()
    return own, followed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.followers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--deltas", type=int, default=40, help="deltas per stream (40)")
    parser.add_argument("--ms", type=int, default=20, help="milliseconds between deltas (20)")
    parser.add_argument("--runs", type=int, default=10, help="streams per backend (10)")
    args = parser.parse_args(argv)
    if args.deltas <= SKIPPED:
        parser.error(f"--deltas must be more than {SKIPPED}")
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    log_dir = Path(tempfile.mkdtemp(prefix="stepchain-followers-"))
    with serve_app(timestamping_upstream(args.deltas, args.ms / 1000)) as upstream:
        for backend in backends:
            try:
                own, followed = measure(backend, f"{upstream}/v1", log_dir, deltas=args.deltas, runs=args.runs)
            except PostgresUnavailable as exc:
                print(f"{backend}: not run ({exc})")
                continue
            print(f"{backend} ({args.runs} streams of {args.deltas} deltas {args.ms} ms apart,"
                  f" {len(followed)} deltas counted):")  # fmt: skip
            print(f"  A's own client     {_summary(own)}")
            print(f"  B's follower       {_summary(followed)}")
    print(f"logs and databases: {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
