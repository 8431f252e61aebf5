"""PostgreSQL rows of the benchmark (issue 11): the same gateway on a throwaway PostgreSQL server.

:func:`start_postgres` starts a server of its own (``initdb`` + ``pg_ctl`` in a temp dir through
:mod:`tests.pg`, as an unprivileged user when run as root) on a free loopback port, tuned as a
production server would be for this comparison: ``fsync`` and ``full_page_writes`` on,
``synchronous_commit = off`` — the same promise as the SQLite default (WAL,
``synchronous=NORMAL``): a crash of the process loses nothing, a power loss may lose the last
commits. It raises :class:`PostgresUnavailable` when there are no server binaries.

Rows it adds, all in the same run as the SQLite rows they sit beside:

- scenarios 1 and 2: ``stepchain (PostgreSQL)``, a gateway on its own database (in
  :mod:`bench.scenarios`, when ``Bench.gateway_pg`` runs);
- scenario 6: the store cost per step transition on PostgreSQL (:func:`bench.resources.scenario_store`
  uses this server);
- scenario 10: throughput of 2 replicas on one PostgreSQL database vs 1 (:func:`scenario_replicas`),
  with the CPU each process used per request, which says what limits it on a small machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .loadgen import Sample, Worker, run_load
from .processes import ServerProcess, cpu_seconds, start_gateway
from .report import Row

__all__ = [
    "PgBench", "PostgresUnavailable", "check_in_use", "scenario_10", "scenario_replicas", "start_postgres",
]  # fmt: skip

_SETTINGS = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "off"}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started (the message says why)."""


@dataclass
class PgBench:
    """A running throwaway server: :meth:`new_database` hands out URLs of empty databases."""

    server: Any  # tests.pg.PgServer

    def new_database(self) -> str:
        return str(self.server.new_database())

    def postmaster_pid(self) -> int | None:
        data_dir = getattr(self.server, "data_dir", None)
        try:
            return int((Path(data_dir) / "postmaster.pid").read_text().split()[0]) if data_dir else None
        except (OSError, ValueError, IndexError):
            return None

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the postmaster and its backends (0 for an external server)."""
        root = self.postmaster_pid()
        if root is None:
            return 0.0
        total = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    stat = fh.read()
                ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
                if pid == root or ppid == root:
                    total += cpu_seconds(pid)
            except (OSError, ValueError):
                continue
        return total


@contextlib.contextmanager
def start_postgres() -> Iterator[PgBench]:
    """A throwaway server for the run (``STEPCHAIN_BENCH_PG_DSN``'s server when that is set: it
    must allow ``CREATE DATABASE``)."""
    try:
        import psycopg

        from tests.pg import PgServer, find_binaries, running_server
    except ImportError as exc:
        raise PostgresUnavailable(f"cannot import the PostgreSQL helpers: {exc}") from None
    external = os.environ.get("STEPCHAIN_BENCH_PG_DSN")
    if external:
        yield PgBench(PgServer(external))
        return
    bin_dir = find_binaries()
    if bin_dir is None:
        raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql")
    try:
        server_cm = running_server(bin_dir)
        server = server_cm.__enter__()
    except Exception as exc:  # initdb or pg_ctl failed: the run goes on without these rows
        raise PostgresUnavailable(f"the PostgreSQL server did not start: {exc}") from None
    try:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            for name, value in _SETTINGS.items():
                conn.execute(f"ALTER SYSTEM SET {name} = {value}")
            conn.execute("SELECT pg_reload_conf()")
        yield PgBench(server)
    finally:
        server_cm.__exit__(None, None, None)


def start_gateway_pg(upstream_base_url: str, log_dir: Path, pg: PgBench, *, name: str,
                     url: str | None = None) -> ServerProcess:  # fmt: skip
    """A gateway on a fresh PostgreSQL database (or on ``url``: another replica of it)."""
    return start_gateway(upstream_base_url, log_dir, name=name, db=url or pg.new_database())


# --- scenario 10: replicas ------------------------------------------------------------------------


async def scenario_replicas(
    upstream: ServerProcess, work_dir: Path, pg: PgBench, *, concurrency: int, count: int,
    capped_cores: float = 0.4,
) -> list[Row]:
    """10: ``POST /v1/responses`` (scenario 1's request) at ``concurrency``, against 1 replica,
    then spread evenly over 2 replicas on the same database; CPU per request of every process.
    Then, where the machine allows (:mod:`bench.cpucap`), the same with each replica capped at
    ``capped_cores`` of a core: replicas on machines of their own, emulated."""
    from .cpucap import cap_available, cpu_capped

    url = pg.new_database()
    replicas = [
        await asyncio.to_thread(start_gateway_pg, upstream.url + "/v1", work_dir, pg, name=f"replica-{i}", url=url)
        for i in range(2)
    ]
    check_in_use(url)
    rows: list[Row] = []
    try:
        rows += await _replica_rows(upstream, pg, replicas, concurrency, count, "")
        why_not = cap_available()
        if why_not is None:
            with contextlib.ExitStack() as stack:
                for replica in replicas:
                    stack.enter_context(cpu_capped(replica.pid, capped_cores))
                rows += await _replica_rows(upstream, pg, replicas, concurrency, count,
                                            f"capped at {capped_cores:g} core each")  # fmt: skip
        else:
            rows[1].note += f"; capped rows not run: {why_not}"
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.stop)
    return rows


async def _replica_rows(
    upstream: ServerProcess, pg: PgBench, replicas: list[ServerProcess], concurrency: int, count: int,
    capped: str,
) -> list[Row]:  # fmt: skip
    from .scenarios import MODEL, TEXT, check_response, warmup_for

    body = orjson.dumps({"model": MODEL, "input": TEXT})
    suffix = "-capped" if capped else ""
    rows: list[Row] = []
    for n in (1, 2):
        members = replicas[:n]

        async def one(worker: Worker, index: int, members: list[ServerProcess] = members) -> Sample:
            target = members[worker.index % len(members)]
            reply = await worker.request("127.0.0.1", target.port, b"POST", "/v1/responses", body)
            error = check_response(reply)
            return Sample(reply.t_end - reply.t_start, ok=error is None, error=error)

        def probe(members: list[ServerProcess] = members) -> float:
            return sum(cpu_seconds(r.pid) for r in members)

        up0, pg0 = cpu_seconds(upstream.pid), pg.cpu_seconds()
        result = await run_load(one, concurrency=concurrency, count=count,
                                warmup=warmup_for(concurrency, count), probe=probe)  # fmt: skip
        up_us = (cpu_seconds(upstream.pid) - up0) * 1e6 / max(result.count, 1)
        pg_us = (pg.cpu_seconds() - pg0) * 1e6 / max(result.count, 1)
        lat = result.latency_ms()
        target = "1 replica" if n == 1 else f"{n} replicas"
        rows.append(Row(
            id=f"10/replicas-{n}{suffix}", scenario="10 replicas (PostgreSQL)",
            target=f"{target}, {capped}" if capped else target, concurrency=concurrency,
            requests=result.count, errors=result.errors, rps=result.rps,
            p50_ms=lat["p50"], p90_ms=lat["p90"], p99_ms=lat["p99"],
            server_cpu_us=None if result.probe_delta is None else result.probe_delta * 1e6 / max(result.count, 1),
            client_cpu_us=result.client_cpu_s * 1e6 / max(result.count, 1),
            first_error=result.first_error,
            extra={"upstream_cpu_us": up_us, "postgres_cpu_us": pg_us},
        ))  # fmt: skip
    one_rps, two_rps = rows[0].rps or 0.0, rows[1].rps or 0.0
    ratio = two_rps / one_rps if one_rps else None
    rows[1].extra["throughput_ratio"] = ratio
    cores = os.cpu_count() or 1
    for row in rows:
        total = sum(v for v in (row.server_cpu_us, row.client_cpu_us, row.extra["upstream_cpu_us"],
                                row.extra["postgres_cpu_us"]) if v)  # fmt: skip
        busy = total * (row.rps or 0) / 1e6
        row.extra["cores_busy"] = busy
        row.note = (f"CPU µs/req: postgres {row.extra['postgres_cpu_us']:.0f}, upstream "
                    f"{row.extra['upstream_cpu_us']:.0f}; this run's processes used {busy:.1f} of "
                    f"{cores} cores")  # fmt: skip
    if ratio is not None:
        rows[1].note = f"×{ratio:.2f} one replica's throughput; " + rows[1].note
    return rows


def check_in_use(url: str) -> None:
    """RuntimeError unless a gateway created its tables in the database at ``url`` (a gateway
    that took ``postgresql://…`` for a file name would not have)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT count(*) FROM responses").fetchone()
    except psycopg.Error as exc:
        raise RuntimeError(f"the gateway did not create its tables in PostgreSQL: {exc}".strip()) from None


async def scenario_10(b: Any) -> list[Row]:
    """10 (:func:`scenario_replicas` with the run's sizes); no rows when no PostgreSQL server runs
    or in a ``--quick`` run without ``--postgres``."""
    if b.pg is None or not b.pg_replicas:
        return []
    return await scenario_replicas(b.upstream, b.work_dir, b.pg, concurrency=b.sizes.replicas_concurrency,
                                   count=b.sizes.replicas_requests)  # fmt: skip
