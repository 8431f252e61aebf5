"""Soak test (issue 5): hold N concurrent streamed responses for a minute, with zero errors.

``python -m bench.soak [--streams 500] [--seconds 60]`` starts the scripted upstream and a gateway
(each its own process, on loopback, fresh SQLite file), opens ``--streams`` streamed
``POST /v1/responses`` at once, each answered by the upstream one piece a second for
``--seconds`` seconds, and checks that every stream ends with ``response.completed`` and
``data: [DONE]``. It prints the gateway's RSS (idle, peak, per held stream), its CPU seconds,
and how many responses the store holds as completed. Exit status 0 iff there were no errors.
Not part of CI (it takes over a minute); results go in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from .loadgen import Sample, Worker, run_load
from .processes import (
    cpu_seconds,
    raise_fd_limit,
    rss_kb,
    start_gateway,
    start_upstream,
)
from .scenarios import LOCALHOST, MODEL, check_response_stream


async def soak(streams: int, seconds: int, work_dir: Path) -> int:
    raise_fd_limit()
    upstream = await asyncio.to_thread(start_upstream, work_dir)
    gateway = await asyncio.to_thread(start_gateway, upstream.url + "/v1", work_dir, name="gateway-soak")
    try:
        idle_kb = rss_kb(gateway.pid)
        cpu0 = cpu_seconds(gateway.pid)
        body = orjson.dumps({"model": MODEL, "stream": True, "input": f"slow {seconds} 1000"})
        peak_kb = idle_kb
        running = True

        async def sample_rss() -> None:
            nonlocal peak_kb
            while running:
                peak_kb = max(peak_kb, rss_kb(gateway.pid))
                await asyncio.sleep(0.5)

        async def one(worker: Worker, index: int) -> Sample:
            reply = await worker.request(LOCALHOST, gateway.port, b"POST", "/v1/responses", body)
            error = check_response_stream(reply)
            return Sample(reply.t_end - reply.t_start, ok=error is None, error=error)

        sampler = asyncio.create_task(sample_rss())
        started = time.perf_counter()
        try:
            result = await run_load(one, concurrency=streams, count=streams, timeout_s=seconds + 120)
        finally:
            running = False
            await sampler
        wall = time.perf_counter() - started
        cpu = cpu_seconds(gateway.pid) - cpu0
    finally:
        await asyncio.to_thread(gateway.stop)
        await asyncio.to_thread(upstream.stop)
    with sqlite3.connect(work_dir / "gateway-soak.db") as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM responses GROUP BY status").fetchall())
    lat = result.latency_ms()
    per_stream_kb = (peak_kb - idle_kb) * 1.024 / streams
    print(f"soak: {streams} concurrent streams × {seconds} s, wall {wall:.1f} s")
    print(f"  completed {result.count}, errors {result.errors}"
          + (f" (first: {result.first_error})" if result.errors else ""))
    print(f"  stream duration p50 {lat['p50'] / 1000:.2f} s, p99 {lat['p99'] / 1000:.2f} s")
    print(f"  gateway RSS {idle_kb / 1024:.1f} MiB idle, {peak_kb / 1024:.1f} MiB peak "
          f"= {per_stream_kb:.1f} KB per held stream; CPU {cpu:.1f} s")
    print(f"  store: {statuses}")
    ok = result.errors == 0 and statuses.get("completed", 0) == streams and len(statuses) == 1
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stepchain-soak-") as tmp:
        return asyncio.run(soak(args.streams, args.seconds, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
