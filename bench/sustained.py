"""Scenario 9: memory under sustained load — does the gateway's RSS stay flat?

A fresh gateway (own SQLite file) takes closed-loop load at ``concurrency`` 16 for ``duration``
seconds (``--sustained-s``; 600 in a full run, 30 with ``--quick``), every other request streamed.
Its RSS is sampled every ``interval`` seconds (10; 2 with ``--quick``). Reported: RSS idle (after
start-up), after the first minute (or the first fifth of a short run), at the end, the least-squares
slope in MiB per minute over the samples after that warm-up, and the request count and errors.

The issue-15 targets: slope ≤ 1 MiB/min after the first minute, and final RSS ≤ idle + 64 MiB.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from .loadgen import Worker
from .processes import rss_kb, start_gateway
from .report import Row

__all__ = ["rss_slope_mib_per_min", "scenario_sustained"]

CONCURRENCY = 16


def rss_slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of ``(seconds, rss KiB)`` samples, in MiB per minute (0 for < 2)."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 60 / 1024


async def scenario_sustained(b) -> list[Row]:  # b: bench.scenarios.Bench
    """9: RSS of a gateway under ``b.sizes``-independent sustained load (see the module doc)."""
    from .scenarios import (
        GATEWAY_DELTA,
        MODEL,
        TEXT,
        check_response,
        check_response_stream,
    )

    duration = b.sustained_s
    interval = 2.0 if duration < 120 else 10.0
    warm = min(60.0, duration / 5)
    gateway = await asyncio.to_thread(
        start_gateway, b.upstream.url + "/v1", b.work_dir, name="gateway-sustained"
    )
    plain = orjson.dumps({"model": MODEL, "input": TEXT})
    streamed = orjson.dumps({"model": MODEL, "input": TEXT, "stream": True})
    counts = {"requests": 0, "errors": 0}
    first_error: list[str] = []
    try:
        idle_kb = rss_kb(gateway.pid)
        started = time.monotonic()
        deadline = started + duration

        async def client(index: int) -> None:
            worker = Worker(index)
            i = index
            try:
                while time.monotonic() < deadline:
                    stream = i % 2 == 1
                    i += 1
                    try:
                        reply = await asyncio.wait_for(worker.request(
                            "127.0.0.1", gateway.port, b"POST", "/v1/responses",
                            streamed if stream else plain, marker=GATEWAY_DELTA if stream else None,
                        ), 60)  # fmt: skip
                        error = check_response_stream(reply) if stream else check_response(reply)
                    except Exception as exc:  # counted, the client goes on
                        error = f"{type(exc).__name__}: {exc}"
                        worker.close()
                        worker = Worker(index)
                    counts["requests"] += 1
                    if error:
                        counts["errors"] += 1
                        if not first_error:
                            first_error.append(error)
            finally:
                await worker.aclose()

        samples: list[tuple[float, int]] = []

        async def sampler() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(interval)
                samples.append((time.monotonic() - started, rss_kb(gateway.pid)))

        await asyncio.gather(sampler(), *(client(i) for i in range(CONCURRENCY)))
    finally:
        await asyncio.to_thread(gateway.stop)
    after_warm = [s for s in samples if s[0] >= warm] or samples
    slope = rss_slope_mib_per_min(after_warm)
    final_kb = samples[-1][1] if samples else idle_kb
    warm_kb = after_warm[0][1] if after_warm else idle_kb
    return [Row(
        id="9/gateway", scenario="9 sustained load", target="stepchain", concurrency=CONCURRENCY,
        requests=counts["requests"], errors=counts["errors"], rps=counts["requests"] / duration,
        first_error=first_error[0] if first_error else None,
        note=(f"{duration:g} s, half streamed: RSS {idle_kb / 1024:.0f} idle → {warm_kb / 1024:.0f} "
              f"at {warm:g} s → {final_kb / 1024:.0f} MiB; slope {slope:+.2f} MiB/min"),
        extra={"idle_mib": idle_kb / 1024, "final_mib": final_kb / 1024, "slope_mib_per_min": slope,
               "samples": samples, "duration_s": duration},
    )]  # fmt: skip
