"""``python -m bench`` (from the repository; ``bench`` is not part of the wheel): run the benchmarks of issue 6 and print one table.

Starts, each in its own process on 127.0.0.1: the scripted upstream (:mod:`bench.upstream`), the
HTTP tool server (:mod:`bench.toolserver`), the gateway (``python -m gateway.cli serve``, fresh
SQLite file), when scenario 1 runs its two floors (do-nothing proxies, :mod:`bench.floorproxy`),
and unless ``--no-peers`` the peers (:mod:`bench.peers`): the LiteLLM proxy and vLLM's
agentic-api (against the upstream's Responses mode). The load generator
(:mod:`bench.loadgen`) runs in this process. Prints the table and the targets, writes the same
as JSON (``--json``), and exits 0 iff every scenario ran with zero errors (1 otherwise,
with the reason on stderr; 2 for bad arguments). A peer that cannot run is reported as
``peer unavailable: <reason>`` and does not fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .instructions import scenario_instructions
from .peers import (
    AGENTIC_SPEC,
    LITELLM_SPEC,
    PeerUnavailable,
    install_agentic,
    install_litellm,
    start_agentic,
    start_litellm,
)
from .processes import (
    ServerError,
    ServerProcess,
    raise_fd_limit,
    start_floor_proxy,
    start_gateway,
    start_tools,
    start_upstream,
)
from .report import (
    Row,
    evaluate_targets,
    floor_notes,
    machine_info,
    render_floor_notes,
    render_table,
    render_targets,
    write_json,
)
from .conversation import scenario_conversation
from .postgres import PostgresUnavailable, check_in_use, scenario_10, start_postgres
from .resources import scenario_memory, scenario_store
from .scenarios import (
    FLOORS,
    FULL,
    QUICK,
    Bench,
    register_tools,
    scenario_ceiling,
    scenario_chat,
    scenario_responses,
    scenario_stream,
    scenario_tool_loop,
    tool_names,
)
from .sustained import scenario_sustained

__all__ = ["SCENARIOS", "main"]

_T = TypeVar("_T")

SCENARIOS: dict[str, tuple[str, Callable[[Bench], Awaitable[list[Row]]]]] = {
    "0": ("load generator ceiling", scenario_ceiling),
    "1": ("responses, non-streaming", scenario_responses),
    "2": ("responses, streaming", scenario_stream),
    "3": ("tool loop", scenario_tool_loop),
    "4": ("chat passthrough", scenario_chat),
    "5": ("previous_response_id conversation", scenario_conversation),
    "6": ("store cost", scenario_store),
    "7": ("memory per held stream", scenario_memory),
    "8": ("instructions per response (valgrind)", scenario_instructions),
    "9": ("memory under sustained load", scenario_sustained),
    "10": ("replicas on one PostgreSQL", scenario_10),
}
# Scenarios with PostgreSQL rows (a throwaway server starts when one of them runs).
POSTGRES_SCENARIOS = {"1", "2", "6", "8", "10"}
# Run only when named with --only (minutes each, not for a smoke run).
ON_REQUEST = {"8", "9"}
DEFAULT_JSON = Path(__file__).resolve().parent / "results-latest.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark the gateway against its upstream (issue 6)."
    )
    parser.add_argument("--quick", action="store_true", help="small counts (CI smoke run, < 1 min)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers (LiteLLM, agentic-api)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL rows (scenarios 1, 2, 6, 8, 10)")
    parser.add_argument(
        "--postgres", action="store_true", help="with --quick: all PostgreSQL rows, not only scenario 6's"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument(
        "--only", default=None, help="comma-separated scenario numbers, e.g. 1,4 (8 runs only when named)"
    )
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0, help="scripted upstream latency")
    parser.add_argument("--tool-latency-ms", type=float, default=None, help="HTTP tool latency (default 10)")
    parser.add_argument("--litellm-spec", default=LITELLM_SPEC, help=f"pip spec of the peer ({LITELLM_SPEC})")
    parser.add_argument("--agentic-spec", default=AGENTIC_SPEC, help=f"pip spec of the peer ({AGENTIC_SPEC})")
    parser.add_argument(
        "--sustained-s", type=float, default=None, help="scenario 9's duration (default 600; 30 with --quick)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, databases)")
    parser.add_argument(
        "--markdown-from", type=Path, default=None, metavar="JSON",
        help="print a results file's table and targets as Markdown (for bench/README.md); no run",
    )  # fmt: skip
    return parser


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop when installed (the servers use it too)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def _run_scenarios(bench: Bench, selected: Sequence[str]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    failures: list[str] = []
    for number in selected:
        title, fn = SCENARIOS[number]
        _say(f"scenario {number}: {title} ...")
        t0 = time.monotonic()
        try:
            produced = await fn(bench)
        except Exception as exc:  # a scenario that crashes is reported, the others still run
            message = f"{type(exc).__name__}: {exc}"
            failures.append(f"scenario {number} ({title}) failed: {message}")
            rows.append(Row(id=f"{number}/failed", scenario=f"{number} {title}", target="FAILED",
                            errors=1, note=message[:120], first_error=message))  # fmt: skip
            continue
        _say(f"scenario {number}: done in {time.monotonic() - t0:.1f} s")
        for row in produced:
            if row.errors and row.target not in ("litellm", "agentic-api"):
                failures.append(
                    f"scenario {number} ({title}), {row.target} c={row.concurrency}: "
                    f"{row.errors} errors; first: {row.first_error}"
                )
            elif row.errors:
                _say(f"peer errors in {row.id}: {row.errors}; first: {row.first_error}")
        rows += produced
    return rows, failures


def _start_peer(args: argparse.Namespace, upstream_base_url: str, work_dir: Path) -> Any:
    exe = install_litellm(args.litellm_spec, log=work_dir / "litellm-install.log")
    server = start_litellm(exe, upstream_base_url, work_dir)
    import httpx

    try:
        for path, body in (
            ("/v1/responses", {"model": "scripted-model", "input": "hi"}),
            ("/v1/chat/completions", {"model": "scripted-model", "messages": [{"role": "user", "content": "hi"}]}),
        ):
            reply = httpx.post(server.url + path, json=body, timeout=30)
            if reply.status_code != 200:
                raise PeerUnavailable(f"litellm {path} answered HTTP {reply.status_code}: {reply.text[:120]}")
    except (httpx.HTTPError, PeerUnavailable) as exc:
        server.stop()
        raise PeerUnavailable(str(exc)) from None
    return server


def _start_agentic(args: argparse.Namespace, upstream_root_url: str, work_dir: Path) -> Any:
    exe = install_agentic(args.agentic_spec, log=work_dir / "agentic-install.log")
    server = start_agentic(exe, upstream_root_url, work_dir)
    import httpx

    try:
        reply = httpx.post(server.url + "/v1/responses", json={"model": "scripted-model", "input": "hi"}, timeout=30)
        if reply.status_code != 200:
            raise PeerUnavailable(f"agentic-api /v1/responses answered HTTP {reply.status_code}: {reply.text[:120]}")
    except (httpx.HTTPError, PeerUnavailable) as exc:
        server.stop()
        raise PeerUnavailable(str(exc)) from None
    return server


def _print_markdown(path: Path) -> int:
    import orjson

    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"bench: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    rows = [Row(**{k: (float("nan") if v is None and k.endswith("_ms") else v) for k, v in r.items()})
            for r in data["rows"]]  # fmt: skip
    print(render_table(rows, markdown=True))
    print()
    print("| target | limit | measured | verdict |")
    print("|---|---|---|---|")
    for t in data.get("targets", []):
        verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        print(f"| {t['name']} | {t['limit']} | {t['measured']} | {verdict} |")
    for note in data.get("floor_notes", []):
        print(f"\nFloor (not a target): {note}.")
    m = data["machine"]
    print(f"\nMachine: {m['nproc']} × {m['cpu']}, {m['memory_gib']} GiB, Python {m['python']}, "
          f"{m['os']}. Command: `{data['command']}` ({data['elapsed_s']:.0f} s). Peers: {data['peers']}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; see the module docstring for the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.markdown_from is not None:
        return _print_markdown(args.markdown_from)
    if args.only is None:
        selected = sorted((n for n in SCENARIOS if n not in ON_REQUEST), key=int)
    else:
        selected = [s.strip() for s in args.only.split(",")]
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown:
        print(f"bench: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.tool_latency_ms is not None:
        from dataclasses import replace

        sizes = replace(sizes, tool_latency_ms=args.tool_latency_ms)
    raise_fd_limit()
    work_dir = Path(tempfile.mkdtemp(prefix="stepchain-bench-"))
    started = time.monotonic()
    peer_status = "skipped (--no-peers)" if args.no_peers else "not started"
    postgres_status = "skipped (--no-postgres)" if args.no_postgres else "not needed"
    failures: list[str] = []
    rows: list[Row] = []
    try:
        with contextlib.ExitStack() as stack:
            try:
                _say(f"starting servers (work dir {work_dir}) ...")
                upstream = stack.enter_context(start_upstream(work_dir, latency_ms=args.upstream_latency_ms))
                tools = stack.enter_context(start_tools(work_dir, latency_ms=sizes.tool_latency_ms))
                gateway = stack.enter_context(start_gateway(upstream.url + "/v1", work_dir))
                names = tool_names(sizes.tools)
                register_tools(gateway.url, tools.url, names)
                floor_servers: dict[str, ServerProcess] = {}
                gateway_nolog = None
                if "2" in selected:  # the event log's cost: the same gateway without it
                    gateway_nolog = stack.enter_context(
                        start_gateway(upstream.url + "/v1", work_dir, name="gateway-nolog", event_log=False)
                    )
                if "1" in selected:
                    for _, mode, field, _ in FLOORS:
                        floor_servers[field] = stack.enter_context(
                            start_floor_proxy(upstream.url + "/v1", work_dir, mode=mode)
                        )
            except (ServerError, RuntimeError, OSError) as exc:
                failures.append(f"start-up failed: {exc}")
                raise _Abort from None
            pg = gateway_pg = gateway_pg_nolog = None
            # A --quick run keeps to scenario 6's PostgreSQL rows (seconds) unless --postgres.
            pg_full = not args.quick or args.postgres
            wanted = POSTGRES_SCENARIOS if pg_full else {"6"}
            if not args.no_postgres and wanted & set(selected):
                try:
                    pg = stack.enter_context(start_postgres())
                    if pg_full and {"1", "2"} & set(selected):
                        url = pg.new_database()
                        gateway_pg = stack.enter_context(
                            start_gateway(upstream.url + "/v1", work_dir, name="gateway-pg", db=url)
                        )
                        try:
                            check_in_use(url)
                        except RuntimeError as exc:  # a gateway without the PostgreSQL backend
                            raise PostgresUnavailable(f"stepchain serve did not use --db postgresql://…: {exc}") from None
                        register_tools(gateway_pg.url, tools.url, names)
                    if pg_full and "2" in selected:
                        gateway_pg_nolog = stack.enter_context(start_gateway(
                            upstream.url + "/v1", work_dir, name="gateway-pg-nolog", db=pg.new_database(),
                            event_log=False,
                        ))  # fmt: skip
                    postgres_status = "running (a throwaway server on loopback, synchronous_commit=off)" + (
                        "" if pg_full else "; --quick: scenario 6 only (--postgres for all its rows)"
                    )
                except PostgresUnavailable as exc:
                    pg = gateway_pg = gateway_pg_nolog = None
                    postgres_status = f"unavailable: {exc}"
                    _say(f"postgres {postgres_status}; its rows are skipped")
                except (ServerError, RuntimeError, OSError) as exc:
                    postgres_status = "failed at start-up"
                    failures.append(f"PostgreSQL start-up failed: {exc}")
                    raise _Abort from None
            peer = agentic = None
            if not args.no_peers:
                statuses = []
                try:
                    peer = stack.enter_context(_start_peer(args, upstream.url + "/v1", work_dir))
                    statuses.append(f"running ({args.litellm_spec})")
                except PeerUnavailable as exc:
                    statuses.append(f"peer unavailable: {exc}")
                    _say(statuses[-1])
                try:
                    agentic = stack.enter_context(_start_agentic(args, upstream.url, work_dir))
                    statuses.append(f"running ({args.agentic_spec})")
                except PeerUnavailable as exc:
                    statuses.append(f"peer unavailable: {exc}")
                    _say(statuses[-1])
                peer_status = "; ".join(statuses)
            sustained_s = args.sustained_s or (30.0 if args.quick else 600.0)
            bench = Bench(
                upstream, tools, gateway, peer, work_dir, sizes, names, **floor_servers,
                agentic=agentic, sustained_s=sustained_s, gateway_pg=gateway_pg, pg=pg,
                gateway_nolog=gateway_nolog, gateway_pg_nolog=gateway_pg_nolog,
                pg_replicas=pg is not None and pg_full,
            )
            rows, failures = _run(_run_scenarios(bench, selected))
    except _Abort:
        pass
    elapsed = time.monotonic() - started
    targets = evaluate_targets(rows, quick=args.quick) if rows else []
    notes = floor_notes(rows, quick=args.quick)
    command = "python -m bench" + ("" if not argv else " " + " ".join(argv))
    machine = machine_info()
    if rows:
        print(render_table(rows))
        print()
    print(f"peers: {peer_status}")
    print(f"postgres: {postgres_status}")
    if targets:
        print("targets (issue 15: ratios in this run; 2-core machine, upstream at 0 ms):")
        print(render_targets(targets))
        if notes:
            print(render_floor_notes(notes))
    print(
        f"machine: {machine['nproc']} × {machine['cpu']}, Python {machine['python']}; "
        f"command: {command}; {elapsed:.0f} s"
    )
    write_json(args.json, {
        "command": command, "quick": args.quick, "machine": machine, "elapsed_s": elapsed,
        "upstream_latency_ms": args.upstream_latency_ms, "sizes": sizes, "peers": peer_status,
        "postgres": postgres_status,
        "rows": rows, "targets": targets, "floor_notes": notes, "failures": failures, "ok": not failures,
    })  # fmt: skip
    print(f"results: {args.json}")
    if failures:
        for failure in failures:
            print(f"bench: FAILED: {failure}", file=sys.stderr)
        print(f"bench: logs kept in {work_dir}", file=sys.stderr)
        return 1
    if args.keep:
        print(f"work dir kept: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


class _Abort(Exception):
    """Start-up failed; the failure is already recorded."""


if __name__ == "__main__":
    sys.exit(main())
