"""The chaos test's processes: the database, the scripted upstream, the tool server, the replicas.

Every process runs in its own process group (``start_new_session``) and is killed with its whole
group when the :class:`Cluster` closes, also when the test fails. A :class:`Replica` can be
SIGKILLed (:meth:`Replica.kill`) and started again on the same port (:meth:`Replica.start`).

The database is either a throwaway PostgreSQL server (:mod:`tests.pg`: ``initdb`` + ``pg_ctl`` in
a temp dir, as an unprivileged user when run as root), restartable with ``pg_ctl restart -m
fast``, or one SQLite file shared by all replicas (one host only; no restart).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Cluster", "Database", "Process", "Replica", "TOOLS", "free_port", "running_cluster",
    "stable_port",
]

ROOT = Path(__file__).resolve().parents[2]
# The four HTTP tools of every chaos response: (name, idempotent). A non-idempotent tool must
# never be executed twice for one call (the tool server's log shows it).
TOOLS: tuple[tuple[str, bool], ...] = (
    ("chaos_lookup_a", True),
    ("chaos_lookup_b", True),
    ("chaos_charge_a", False),
    ("chaos_charge_b", False),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def stable_port() -> int:
    """A free port outside the kernel's ephemeral range, for a server that is started again on
    the same port after being killed. A port from ``free_port`` is an ephemeral one: while its
    server is down, the kernel may give it to any outgoing connection as its local port (the
    replicas reconnect their database pools all at once when PostgreSQL restarts), and that
    connection then holds it for good: the restart fails with "address already in use". No
    outgoing connection is ever given a port below the ephemeral range."""
    low, _high = _ephemeral_ports()
    rng = random.SystemRandom()
    if low > 12_000:
        for _ in range(200):
            port = rng.randrange(10_000, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    return free_port()


def _http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(5)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPCHAIN_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Process:
    """A server process in its own process group, on a fixed port, logging to ``log``."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log: Path, *,
                 ready_path: str = "/healthz", env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.name, self.argv, self.port, self.log = name, list(argv), port, log
        self.ready_path = ready_path
        self.env = _child_env(env)
        self.url = f"http://127.0.0.1:{port}"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        """Start and wait until ``GET ready_path`` answers 200; RuntimeError with the log's tail."""
        with open(self.log, "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} start {self.name}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.log.parent, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not _http_ok(self.port, self.ready_path):
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) at start-up: "
                                   f"{self.tail(1)[:200]}\n{self.tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} was not ready within {timeout_s:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group and reap the process."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Replica(Process):
    """One ``stepchain serve`` replica; ``kills`` counts the SIGKILLs it got."""

    kills = 0


class Database:
    """Where the replicas keep their state: ``url`` is what ``--db`` gets."""

    def __init__(self, url: str, *, pg_server: Any = None, sqlite_path: Path | None = None) -> None:
        self.url = url
        self.pg_server = pg_server
        self.sqlite_path = sqlite_path

    @property
    def backend(self) -> str:
        return "postgres" if self.pg_server is not None else "sqlite"

    @property
    def restartable(self) -> bool:
        return self.pg_server is not None and getattr(self.pg_server, "managed", False)

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is dropped, the server comes back."""
        self.pg_server.pg_ctl("restart", "-m", "fast", "-w", "-t", "120", timeout=180)

    def check_in_use(self) -> None:
        """RuntimeError unless the replicas created their schema in this database (a gateway that
        took ``postgresql://…`` for a file name would not have)."""
        try:
            self.query("SELECT count(*) FROM responses")
        except Exception as exc:
            raise RuntimeError(f"the replicas did not create their tables in {self.backend} "
                               f"(is --db {self.url.split('@')[-1]} wired to the store?): {exc}") from None

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of one read-only query, straight from the database (not through a replica)."""
        if self.pg_server is not None:
            import psycopg

            deadline = time.monotonic() + 60
            while True:
                try:
                    with psycopg.connect(self.url, connect_timeout=10) as conn:
                        return list(conn.execute(sql).fetchall())
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        assert self.sqlite_path is not None
        with contextlib.closing(sqlite3.connect(self.sqlite_path, timeout=30)) as conn:
            return list(conn.execute(sql).fetchall())


@dataclass
class Cluster:
    """The running system: ``replicas`` behind no load balancer (clients pick one)."""

    db: Database
    upstream: Process
    tools: Process
    replicas: list[Replica]
    tool_log: Path
    work_dir: Path

    def alive_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]


def _tools_toml(tools_url: str) -> str:
    out = []
    for name, idempotent in TOOLS:
        out.append(
            "[[tools]]\n"
            f'name = "{name}"\n'
            f'description = "Chaos tool {name}: logs every call."\n'
            'kind = "http"\nattach = "on_request"\n'
            f'url = "{tools_url}/{name}"\n'
            "timeout_s = 60\nallow_private = true\n"
            f"idempotent = {'true' if idempotent else 'false'}\n"
            "[tools.parameters]\n"
            'type = "object"\nrequired = ["q"]\n'
            '[tools.parameters.properties.q]\ntype = "string"\n'
        )
    return "\n".join(out)


@contextlib.contextmanager
def _database(backend: str, work_dir: Path, pg_server: Any = None) -> Iterator[Database]:
    if pg_server is not None:
        yield Database(pg_server.new_database(), pg_server=pg_server)
        return
    if backend == "sqlite":
        path = work_dir / "stepchain.db"
        yield Database(str(path), sqlite_path=path)
        return
    from tests.pg import find_binaries, running_server

    external = os.environ.get("STEPCHAIN_TEST_PG_DSN")
    if external:
        from tests.pg import PgServer

        server = PgServer(external)
        yield Database(server.new_database(), pg_server=server)
        return
    bin_dir = find_binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    with running_server(bin_dir) as server:
        yield Database(server.new_database(), pg_server=server)


@contextlib.contextmanager
def running_cluster(work_dir: Path, *, backend: str = "postgres", replicas: int = 3,
                    tool_latency_ms: float = 300.0, replica_env: Mapping[str, str] | None = None,
                    pg_server: Any = None) -> Iterator[Cluster]:  # fmt: skip
    """Start the database, upstream, tool server and ``replicas`` gateways; stop all at the end.

    ``pg_server`` (a :class:`tests.pg.PgServer`, e.g. the ``pg_server`` fixture) is used for a
    fresh database instead of starting a server of its own."""
    started: list[Process] = []
    with _database(backend, work_dir, pg_server) as db:
        try:
            py = sys.executable
            port = free_port()
            upstream = Process("upstream", [py, "-m", "tests.chaos.upstream", "--port", str(port)], port,
                               work_dir / "upstream.log", ready_path="/ping")  # fmt: skip
            started.append(upstream)
            upstream.start()
            tool_log = work_dir / "tool-calls.jsonl"
            port = free_port()
            tools = Process("tools", [py, "-m", "tests.chaos.toolserver", "--port", str(port), "--log",
                                      str(tool_log), "--latency-ms", f"{tool_latency_ms:g}"],
                            port, work_dir / "tools.log", ready_path="/")  # fmt: skip
            started.append(tools)
            tools.start()
            config = work_dir / "tools.toml"
            config.write_text(_tools_toml(tools.url))
            members = []
            for i in range(replicas):
                port = stable_port()  # restarted on the same port (see stable_port)
                argv = [py, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                        "--upstream-base-url", upstream.url + "/v1", "--db", db.url,
                        "--config", str(config), "--log-level", "warning"]  # fmt: skip
                replica = Replica(f"replica-{i}", argv, port, work_dir / f"replica-{i}.log", env=replica_env)
                started.append(replica)
                members.append(replica)
            for replica in members:  # one at a time: the first one migrates the schema
                replica.start()
            db.check_in_use()
            yield Cluster(db, upstream, tools, members, tool_log, work_dir)
        finally:
            for process in reversed(started):
                process.kill()
