"""Per-thread gateway CPU of paced streamed responses, two checkouts side by side (issue 11).

``python -m bench.threads BASELINE_CHECKOUT`` starts one scripted upstream and three SQLite
gateways on it — ``BASELINE_CHECKOUT``'s (``before``, e.g. a ``git worktree`` of main), this
checkout's (``after``) and this checkout's with the durable event log switched off (``off``,
:mod:`bench.no_event_log`) — and
drives each in turn with ``--streams`` paced streams (``slow DELTAS MS``: DELTAS text deltas MS
milliseconds apart) at ``--concurrency``, in the order before, after, off, off, after, before
(``--rounds`` times), so drift in the machine falls on all three alike. ``--stream-flush-s S``
runs all three with that ``stream_flush_s`` (the interval between a stream's log writes).

For each block it reads every thread's CPU time from ``/proc/<pid>/task/*/stat`` (user +
system, in clock ticks) before and after, and prints µs of CPU per response for the gateway's
event-loop thread (the process's main thread), its busiest other thread (the SQLite store's
worker) and the rest, then the means per gateway and each total ÷ ``off``'s. Unlike scenario
2's paced rows, which time the whole process, this shows where a change to the store lands.
Linux only (``/proc``). The numbers are CPU per response, never a pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import orjson

from bench import processes

__all__ = ["main", "thread_cpu_s"]

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """Each thread of ``pid``: its CPU time so far, user + system, in seconds (``/proc``)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
        except FileNotFoundError:
            continue  # the thread ended in between
        fields = stat[stat.rindex(b")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * _TICK_S
    return out


def _per_response_us(pid: int, before: dict[int, float], after: dict[int, float], n: int) -> dict[str, float]:
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main = used.pop(pid, 0.0)
    others = sorted(used.values(), reverse=True)
    store = others[0] if others else 0.0
    return {"event loop": main * 1e6 / n, "store": store * 1e6 / n, "rest": sum(others[1:]) * 1e6 / n}


async def _drive(url: str, n: int, concurrency: int, body: bytes) -> None:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        left = n

        async def one_client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with client.stream(
                    "POST", "/v1/responses", content=body, headers={"content-type": "application/json"}
                ) as reply:
                    if reply.status_code != 200:
                        text = (await reply.aread())[:200]
                        raise RuntimeError(f"{url}: HTTP {reply.status_code}: {text!r}")
                    async for _ in reply.aiter_bytes():
                        pass

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="the checkout to compare with (its gateway is 'before')")
    parser.add_argument("--streams", type=int, default=400, help="streams per block (400)")
    parser.add_argument("--concurrency", type=int, default=16, help="streams at once (16)")
    parser.add_argument("--deltas", type=int, default=40, help="text deltas per stream (40)")
    parser.add_argument("--ms", type=int, default=5, help="milliseconds between deltas (5)")
    parser.add_argument("--rounds", type=int, default=2, help="times through the six blocks (2)")
    parser.add_argument("--stream-flush-s", type=float, default=None,
                        help="every gateway's stream_flush_s (default: the setting's default)")
    args = parser.parse_args(argv)
    baseline = args.baseline.resolve()
    if not (baseline / "gateway" / "cli.py").is_file():
        parser.error(f"{baseline} is not a stepchain checkout")
    body = orjson.dumps({"model": "m", "input": f"slow {args.deltas} {args.ms}", "stream": True})
    log_dir = Path(tempfile.mkdtemp(prefix="stepchain-threads-"))
    upstream = processes.start_upstream(log_dir)
    base = f"http://127.0.0.1:{upstream.port}/v1"
    settings = {} if args.stream_flush_s is None else {"STEPCHAIN_STREAM_FLUSH_S": str(args.stream_flush_s)}
    gateways = {"before": processes.start_gateway(base, log_dir, name="before", root=baseline, settings=settings)}
    gateways["after"] = processes.start_gateway(base, log_dir, name="after", settings=settings)
    gateways["off"] = processes.start_gateway(base, log_dir, name="off", event_log=False, settings=settings)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in gateways}
    try:
        for gateway in gateways.values():  # warm-up: imports, caches, the first pages
            asyncio.run(_drive(f"http://127.0.0.1:{gateway.port}", min(64, args.streams), args.concurrency, body))
        for name in ["before", "after", "off", "off", "after", "before"] * args.rounds:
            gateway = gateways[name]
            pid = gateway.popen.pid
            started, t0 = thread_cpu_s(pid), time.perf_counter()
            asyncio.run(_drive(f"http://127.0.0.1:{gateway.port}", args.streams, args.concurrency, body))
            block = _per_response_us(pid, started, thread_cpu_s(pid), args.streams)
            print(f"{name:>6}  " + "  ".join(f"{k} {v:,.0f}" for k, v in block.items())
                  + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
            results[name].append(block)
    finally:
        for gateway in gateways.values():
            gateway.stop()
        upstream.stop()
    means = {
        name: {key: sum(block[key] for block in blocks) / len(blocks) for key in blocks[0]}
        for name, blocks in results.items()
    }
    off = sum(means["off"].values())
    flush = "default" if args.stream_flush_s is None else f"{args.stream_flush_s:g} s"
    print(f"µs of CPU per paced response ({args.deltas} × {args.ms} ms, c={args.concurrency},"
          f" stream_flush_s {flush}), means:")
    for name, mean in means.items():
        total = sum(mean.values())
        print(f"{name:>6}  " + "  ".join(f"{k} {v:,.0f}" for k, v in mean.items())
              + f"  total {total:,.0f}  ÷ off ×{total / off:.3f}")  # fmt: skip
    print(f"logs and databases: {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
