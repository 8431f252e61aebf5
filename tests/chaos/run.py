"""The chaos scenario: streamed responses through the openai SDK while replicas die.

:func:`run_chaos` starts a :class:`tests.chaos.cluster.Cluster`, runs ``clients`` concurrent
clients (each one streamed response after another while the chaos lasts, each response a
``rounds``-round loop of four parallel HTTP tools), SIGKILLs a random replica every
``kill_every_s`` seconds and starts it again ``restart_after_s`` later, restarts the PostgreSQL
server once, lets everything finish, and returns a :class:`ChaosReport`.

A client whose replica dies (or whose stream ends without a terminal event) re-attaches to another
replica with ``GET /v1/responses/{id}?stream=true&starting_after=<last sequence number seen>``.
The report holds, per guarantee, what broke it (empty lists when it holds):

- ``not_terminal``: responses (seen by a client, or found in the database) not terminal at the end;
- ``steps_processing``: steps still ``processing`` in the database;
- ``duplicate_executions``: non-idempotent tool calls the tool server executed more than once;
- ``stream_mismatches``: streams whose events (concatenated over re-attachments) are not exactly a
  fresh full replay from another replica, have a gap or repeat in ``sequence_number``, not
  exactly one terminal event, last, or a terminal ``output`` other than the items their
  ``output_item.added`` / ``.done`` events showed (a take-over, or several, loses no item).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson

from .cluster import TOOLS, Cluster, Replica, running_cluster
from .toolserver import read_log
from .upstream import chaos_prompt

__all__ = ["LONG", "SHORT", "ChaosConfig", "ChaosReport", "run_chaos"]

TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "incomplete", "cancelled"})
MODEL = "scripted-model"
# A full replay of a terminal response ends on its own; one that does not is a finding, not a hang.
REPLAY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ChaosConfig:
    """Sizes and timings (seconds) of one chaos run."""

    clients: int = 50
    replicas: int = 3
    chaos_s: float = 30.0
    kill_every_s: float = 3.0
    restart_after_s: float = 1.0
    restart_database: bool = True
    rounds: int = 2
    pieces: int = 12
    piece_ms: int = 40
    tool_latency_ms: float = 300.0
    settle_s: float = 120.0
    backend: str = "postgres"
    seed: int | None = None


SHORT = ChaosConfig()  # about a minute of kills and settling, plus start-up
LONG = ChaosConfig(chaos_s=180.0, kill_every_s=4.0, rounds=3, pieces=20, settle_s=240.0)


@dataclass
class Stream:
    """What one client saw of one response: every event (as the SDK parsed it), in order."""

    token: str
    response_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    reattached_after: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    terminal: str | None = None
    replay_from: int | None = None

    @property
    def last_seq(self) -> int:
        return self.events[-1].get("sequence_number", -1) if self.events else -1


@dataclass
class ChaosReport:
    """The outcome of :func:`run_chaos` (see the module docstring for the four guarantees)."""

    config: ChaosConfig
    backend: str
    streams: list[Stream]
    kills: list[tuple[float, str]]
    database_restarts: int
    database_restartable: bool
    restart_failures: list[str]
    responses_by_status: dict[str, int]
    steps_by_state: dict[str, int]
    tool_executions: int
    tool_calls_without_key: int
    not_terminal: list[str]
    steps_processing: int
    duplicate_executions: list[str]
    stream_mismatches: list[str]
    elapsed_s: float
    work_dir: Path

    @property
    def responses(self) -> list[Stream]:
        """The streams that got as far as ``response.created`` (the others were refused)."""
        return [s for s in self.streams if s.response_id is not None]

    @property
    def reattached(self) -> list[Stream]:
        return [s for s in self.streams if s.reattached_after]

    @property
    def ok(self) -> bool:
        return not (self.not_terminal or self.steps_processing or self.duplicate_executions
                    or self.stream_mismatches)  # fmt: skip

    def summary(self) -> str:
        lines = [
            f"chaos on {self.backend}: {len(self.responses)} streamed responses by {self.config.clients} "
            f"clients, {len(self.kills)} replica kills, {self.database_restarts} database restart(s), "
            f"{self.elapsed_s:.0f} s; {len(self.reattached)} streams re-attached "
            f"({sum(len(s.reattached_after) for s in self.streams)} re-attachments)",
            f"responses by status: {self.responses_by_status}; steps by state: {self.steps_by_state}",
            f"tool server: {self.tool_executions} executions, {self.tool_calls_without_key} calls "
            "without an Idempotency-Key",
            _verdict("every killed replica started again", self.restart_failures),
            _verdict("every response terminal", self.not_terminal),
            _verdict("no step processing", [f"{self.steps_processing} steps"] if self.steps_processing else []),
            _verdict("no non-idempotent tool call executed twice", self.duplicate_executions),
            _verdict("re-attached streams got exactly the events they missed", self.stream_mismatches),
            f"logs: {self.work_dir}",
        ]
        return "\n".join(lines)


def _verdict(name: str, problems: list[str]) -> str:
    if not problems:
        return f"  HOLDS  {name}"
    shown = "; ".join(problems[:5]) + (f"; … ({len(problems)} in all)" if len(problems) > 5 else "")
    return f"  BROKEN {name}: {shown}"


class _EndedEarly(Exception):
    """The stream ended without a terminal event."""


_RETRYABLE = (openai.APIError, httpx.HTTPError, _EndedEarly, OSError)


class _Run:
    def __init__(self, cluster: Cluster, config: ChaosConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.random = random.Random(config.seed)
        self.run_id = secrets.token_hex(3)
        self.clients = [
            openai.AsyncOpenAI(
                base_url=r.url + "/v1", api_key="chaos", max_retries=0,
                timeout=httpx.Timeout(60.0, connect=3.0),
            )  # fmt: skip
            for r in cluster.replicas
        ]
        self.streams: list[Stream] = []
        self.kills: list[tuple[float, str]] = []
        self.database_restarts = 0
        self.database_up = threading.Event()  # cleared while the database restarts
        self.database_up.set()
        self.chaos_over = asyncio.Event()
        self.stopping = threading.Event()  # the chaos threads stop early when set
        self.restart_failures: list[str] = []
        self.t0 = time.monotonic()

    def _pick(self, avoid: int | None, start: int) -> int:
        n = len(self.cluster.replicas)
        order = [(start + k) % n for k in range(n)]
        alive = [i for i in order if self.cluster.replicas[i].alive() and i != avoid]
        return alive[0] if alive else order[0] if order[0] != avoid else order[1 % n]

    async def _consume(self, stream: Stream, events: Any) -> None:
        async for event in events:
            data = event.to_dict()
            stream.events.append(data)
            if data.get("type") == "response.created" and stream.response_id is None:
                stream.response_id = data["response"]["id"]
            if data.get("type") in TERMINAL:
                stream.terminal = data["type"]
        if stream.terminal is None:
            raise _EndedEarly("stream ended without a terminal event")

    async def one_response(self, client_no: int, serial: int) -> Stream:
        tools = [{"type": "function", "name": name} for name, _ in TOOLS]
        cfg = self.config
        deadline_over = time.monotonic() + cfg.chaos_s + cfg.settle_s
        start = client_no
        for attempt in itertools.count():
            token = f"{self.run_id}c{client_no}r{serial}a{attempt}"
            stream = Stream(token)
            self.streams.append(stream)
            index = self._pick(None, start + attempt)
            stream.replicas.append(index)
            try:
                events = await self.clients[index].responses.create(
                    model=MODEL, input=chaos_prompt(token, rounds=cfg.rounds, pieces=cfg.pieces,
                                                    piece_ms=cfg.piece_ms),
                    tools=tools, stream=True,  # type: ignore[arg-type]
                )  # fmt: skip
                await self._consume(stream, events)
                return stream
            except _RETRYABLE as exc:
                stream.errors.append(f"create on replica {index}: {type(exc).__name__}: {exc}"[:300])
                if stream.response_id is not None:
                    break
                if time.monotonic() > deadline_over or attempt > 50:
                    return stream
                await asyncio.sleep(0.2)
        last = stream.replicas[-1]
        for attempt in itertools.count():
            if stream.terminal is not None or time.monotonic() > deadline_over or attempt > 60:
                break
            index = self._pick(last, last + 1 + attempt)
            last = index
            stream.replicas.append(index)
            stream.reattached_after.append(stream.last_seq)
            try:
                events = await self.clients[index].responses.retrieve(
                    stream.response_id, stream=True, starting_after=stream.last_seq  # type: ignore[arg-type]
                )
                await self._consume(stream, events)
            except _RETRYABLE as exc:
                stream.errors.append(f"re-attach on replica {index}: {type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
        return stream

    async def client(self, client_no: int) -> None:
        for serial in itertools.count():
            await self.one_response(client_no, serial)
            if self.chaos_over.is_set():
                return

    def killer(self) -> None:
        """Every ``kill_every_s``: SIGKILL a random live replica (never the last one up) and
        start it again ``restart_after_s`` later. Runs in a thread of its own, so a busy event
        loop (50 clients parsing events) does not slow the chaos down."""
        cfg = self.config
        end = self.t0 + cfg.chaos_s
        restarting: set[str] = set()
        lock = threading.Lock()
        restarts: list[threading.Thread] = []

        def restart(victim: Replica) -> None:
            time.sleep(cfg.restart_after_s)
            try:
                self.start_replica(victim)
            except RuntimeError as exc:  # a finding, not a crash of the harness
                self.restart_failures.append(f"{victim.name}: {str(exc)[:800]}")
            finally:
                with lock:
                    restarting.discard(victim.name)

        while True:
            time.sleep(cfg.kill_every_s)
            if time.monotonic() >= end or self.stopping.is_set():
                break
            with lock:
                up = [r for r in self.cluster.alive_replicas() if r.name not in restarting]
                if len(up) < 2:
                    continue
                victim = self.random.choice(up)
                restarting.add(victim.name)
            victim.kill()
            self.kills.append((time.monotonic() - self.t0, victim.name))
            thread = threading.Thread(target=restart, args=(victim,), name=f"restart-{victim.name}")
            thread.start()
            restarts.append(thread)
        for thread in restarts:
            thread.join()

    def start_replica(self, replica: Replica) -> None:
        """Start ``replica`` again. A replica that starts while the database is down or
        restarting exits (status 2: "unreachable --db at start-up", or 3 when the database
        went away between that check and opening the store), as specified: so it is tried
        again, for up to a minute after the database is back (a restart in progress does not
        count against that minute). RuntimeError with every failed attempt's reason."""
        deadline = time.monotonic() + 60
        failures: list[str] = []
        while True:
            if not self.database_up.is_set():
                self.database_up.wait(300)
                deadline = max(deadline, time.monotonic() + 60)
            try:
                replica.start(timeout_s=45)
                return
            except RuntimeError as exc:
                failures.append(str(exc).splitlines()[0])
                if time.monotonic() > deadline or self.stopping.is_set():
                    reasons = collections.Counter(failures).most_common(3)
                    raise RuntimeError(
                        f"{len(failures)} failed start(s): "
                        + "; ".join(f"{n}× {why}" for why, n in reasons)
                        + f"\nlog tail:\n{replica.tail(8)}"
                    ) from None
                time.sleep(0.5)

    def database_restarter(self) -> None:
        if not (self.config.restart_database and self.cluster.db.restartable):
            return
        if self.stopping.wait(self.config.chaos_s / 2):
            return
        self.database_up.clear()
        try:
            self.cluster.db.restart()
        finally:
            self.database_up.set()
        self.database_restarts += 1

    async def main(self) -> None:
        clients = [asyncio.create_task(self.client(i)) for i in range(self.config.clients)]
        chaos = [asyncio.create_task(asyncio.to_thread(self.killer)),
                 asyncio.create_task(asyncio.to_thread(self.database_restarter))]  # fmt: skip
        try:
            await asyncio.gather(*chaos)
            remaining = self.t0 + self.config.chaos_s - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
            self.chaos_over.set()
            for replica in self.cluster.replicas:  # a replica whose restart failed: once more
                if not replica.alive():
                    try:
                        await asyncio.to_thread(self.start_replica, replica)
                    except RuntimeError as exc:
                        self.restart_failures.append(f"{replica.name} (after the chaos): {str(exc)[:800]}")
            await asyncio.wait(clients, timeout=self.config.settle_s + 30)
        finally:
            self.stopping.set()
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, *chaos, return_exceptions=True)
        for task in clients:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def replay(self, stream: Stream) -> list[dict[str, Any]] | str:
        """A fresh full replay of ``stream``'s response from a replica it did not end on. A
        replay whose own connection fails (not a finding about the response: e.g. a pooled
        keep-alive connection to a replica's killed predecessor) is tried again, up to three
        times, from the next replica."""
        failures: list[str] = []
        for attempt in range(3):
            index = self._pick(stream.replicas[-1], stream.replicas[-1] + 1 + attempt)
            stream.replay_from = index
            out: list[dict[str, Any]] = []

            async def read() -> None:
                events = await self.clients[index].responses.retrieve(stream.response_id, stream=True)  # type: ignore[arg-type]
                async for event in events:
                    out.append(event.to_dict())

            try:
                await asyncio.wait_for(read(), REPLAY_TIMEOUT_S)
            except _RETRYABLE as exc:
                failures.append(f"replica {index}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            except asyncio.TimeoutError:
                return f"the replay did not end within {REPLAY_TIMEOUT_S:g} s ({len(out)} events)"
            return out
        return "; ".join(failures)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def _check_sequence(events: list[dict[str, Any]]) -> str | None:
    numbers = [e.get("sequence_number") for e in events]
    if numbers != list(range(len(numbers))):
        firsts = next((i for i, n in enumerate(numbers) if n != i), 0)
        return f"sequence numbers not 0..{len(numbers) - 1}: …{numbers[max(0, firsts - 2):firsts + 3]}… at {firsts}"
    terminals = [i for i, e in enumerate(events) if e.get("type") in TERMINAL]
    if len(terminals) != 1 or terminals[0] != len(events) - 1:
        return f"terminal events at {terminals} of {len(events)}"
    # The output: one item per output_item.added, each as its output_item.done event showed it.
    added = [e.get("output_index") for e in events if e.get("type") == "response.output_item.added"]
    done = {e.get("output_index"): e.get("item") for e in events
            if e.get("type") == "response.output_item.done"}  # fmt: skip
    output = (events[-1].get("response") or {}).get("output")
    if added != list(range(len(added))) or output != [done.get(i) for i in range(len(added))]:
        return (f"the terminal output ({len(output or [])} items) is not the {len(added)} items "
                f"added and done (added at {added[:12]}, done at {sorted(done)[:12]})")
    return None


def _difference(seen: list[dict[str, Any]], replay: list[dict[str, Any]], at: int) -> str:
    """Where two event lists first differ, in a few words (the type, the first differing field)."""
    if at >= len(seen) or at >= len(replay):
        return "one is a prefix of the other"
    a, b = seen[at], replay[at]
    if a.get("type") != b.get("type"):
        return f"client got {a.get('type')}, replay has {b.get('type')}"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    field = keys[0] if keys else "?"
    return f"{a.get('type')}: {field} {str(a.get(field))[:80]!r} vs {str(b.get(field))[:80]!r}"


async def _check_streams(run: _Run) -> list[str]:
    streams = [s for s in run.streams if s.response_id is not None]
    gate = asyncio.Semaphore(8)

    async def replay(stream: Stream) -> list[dict[str, Any]] | str:
        if _check_sequence(stream.events):
            return []
        async with gate:
            return await run.replay(stream)

    replays = await asyncio.gather(*(replay(s) for s in streams))
    problems: list[str] = []
    for stream, replay in zip(streams, replays):
        where = f"{stream.response_id} (replicas {stream.replicas}, re-attached after {stream.reattached_after})"
        problem = _check_sequence(stream.events)
        if problem:
            problems.append(f"{where}: client saw {problem}")
            continue
        if isinstance(replay, str):
            problems.append(f"{where}: replay from replica {stream.replay_from} failed: {replay}")
        elif replay != stream.events:
            if len(problems) < 5:  # the evidence, beside the logs
                (run.cluster.work_dir / f"mismatch-{stream.response_id}.json").write_bytes(orjson.dumps({
                    "replicas": stream.replicas, "reattached_after": stream.reattached_after,
                    "replay_from": stream.replay_from, "client": stream.events, "replay": replay,
                }))  # fmt: skip
            at = next((i for i, (a, b) in enumerate(zip(replay, stream.events)) if a != b),
                      min(len(replay), len(stream.events)))  # fmt: skip
            problems.append(f"{where}: differs from a full replay on replica {stream.replay_from} at "
                            f"event {at} (client {len(stream.events)} events, replay {len(replay)}): "
                            f"{_difference(stream.events, replay, at)}")  # fmt: skip
    return problems


def _check_tools(cluster: Cluster) -> tuple[int, int, list[str]]:
    non_idempotent = {name for name, idempotent in TOOLS if not idempotent}
    entries = read_log(cluster.tool_log)
    executions: collections.Counter[tuple[str, str]] = collections.Counter()
    for e in entries:
        if e.get("executed") and e["tool"] in non_idempotent:
            executions[(e["tool"], str((e.get("arguments") or {}).get("q")))] += 1
    duplicates = [f"{tool} {q} executed {n}×" for (tool, q), n in executions.items() if n > 1]
    without_key = sum(1 for e in entries if not e.get("idempotency_key"))
    return sum(1 for e in entries if e.get("executed")), without_key, duplicates


def run_chaos(config: ChaosConfig = SHORT, work_dir: Path | None = None, *, pg_server: Any = None) -> ChaosReport:
    """Run the scenario (see the module docstring); ``work_dir`` keeps the logs (a temp dir if None);
    ``pg_server`` (:class:`tests.pg.PgServer`) gives the database instead of a server of its own."""
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="stepchain-chaos-"))
    started = time.monotonic()
    with running_cluster(work_dir, backend=config.backend, replicas=config.replicas,
                         tool_latency_ms=config.tool_latency_ms, pg_server=pg_server) as cluster:  # fmt: skip
        run = _Run(cluster, config)

        async def go() -> list[str]:
            try:
                await run.main()
                return await asyncio.wait_for(_check_streams(run), REPLAY_TIMEOUT_S * 3)
            finally:
                await run.close()

        mismatches = asyncio.run(go())
        responses = dict(cluster.db.query("SELECT status, count(*) FROM responses GROUP BY status"))
        steps = dict(cluster.db.query("SELECT state, count(*) FROM steps GROUP BY state"))
        stuck = cluster.db.query("SELECT id, status FROM responses WHERE status NOT IN "
                                 "('completed', 'failed', 'incomplete', 'cancelled')")  # fmt: skip
        executions, without_key, duplicates = _check_tools(cluster)
    not_terminal = [f"{rid} is {status} in the database" for rid, status in stuck]
    not_terminal += [
        f"{s.response_id or s.token}: the client saw no terminal event ({s.errors[-1:] or 'no error'})"
        for s in run.streams if s.terminal is None and s.response_id is not None
    ]  # fmt: skip
    return ChaosReport(
        config=config, backend=cluster.db.backend, streams=run.streams, kills=run.kills,
        database_restarts=run.database_restarts,
        database_restartable=cluster.db.restartable, restart_failures=run.restart_failures,
        responses_by_status=responses, steps_by_state=steps,
        tool_executions=executions, tool_calls_without_key=without_key, not_terminal=not_terminal,
        steps_processing=steps.get("processing", 0), duplicate_executions=duplicates,
        stream_mismatches=mismatches, elapsed_s=time.monotonic() - started, work_dir=work_dir,
    )  # fmt: skip


