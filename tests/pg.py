"""A throwaway PostgreSQL server for tests: ``initdb`` into a temp dir, ``pg_ctl start`` on a free
127.0.0.1 port (socket in the same dir), a fresh database per test, stopped at the end.

As root (CI), ``initdb`` refuses to run, so the server runs as the unprivileged system user
``stepchain-pg`` (created if missing) through ``runuser``. With ``STEPCHAIN_TEST_PG_DSN`` set, that
server is used instead (it must allow ``CREATE DATABASE``), and :meth:`PgServer.stop`/``start``
are unavailable. :func:`find_binaries` looks on PATH, then in ``/usr/lib/postgresql/*/bin``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import conninfo, sql

__all__ = ["PASSWORD_ROLE", "PG_USER", "PgServer", "find_binaries", "running_server", "url_for"]

PG_USER = "stepchain-pg"
#: A role that logs in with a password on a managed server (see :func:`running_server`).
PASSWORD_ROLE = "stepchain_pw"
_counter = itertools.count(1)


def find_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (PostgreSQL 12 or later), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def url_for(dsn: str, dbname: str) -> str:
    """A ``postgresql://`` URL for database ``dbname`` on the server ``dsn`` points at."""
    params = conninfo.conninfo_to_dict(dsn)
    user = quote(str(params.get("user") or "postgres"), safe="")
    password = params.get("password")
    auth = user if not password else f"{user}:{quote(str(password), safe='')}"
    host = str(params.get("host") or "127.0.0.1")
    netloc = f"[{host}]" if ":" in host else host
    if host.startswith("/"):  # a socket directory goes in the query string
        return f"postgresql://{auth}@/{quote(dbname)}?host={quote(host)}&port={params.get('port') or 5432}"
    return f"postgresql://{auth}@{netloc}:{params.get('port') or 5432}/{quote(dbname)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A running server: :meth:`new_database` hands out DSNs of fresh empty databases."""

    def __init__(self, admin_dsn: str, *, data_dir: Path | None = None, bin_dir: Path | None = None,
                 as_user: str | None = None) -> None:  # fmt: skip
        self.admin_dsn = admin_dsn
        self.data_dir = data_dir
        self.bin_dir = bin_dir
        self.as_user = as_user
        self.log = None if data_dir is None else data_dir.parent / "server.log"

    @property
    def managed(self) -> bool:
        """True when this process started the server (so it may stop and start it)."""
        return self.data_dir is not None

    def new_database(self) -> str:
        """Create an empty database; return its DSN."""
        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        return url_for(self.admin_dsn, name)

    def _cmd(self, *args: str) -> list[str]:
        assert self.bin_dir is not None
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        return ["runuser", "-u", self.as_user, "--", *cmd] if self.as_user else cmd

    def pg_ctl(self, *args: str, timeout: float = 120) -> None:
        assert self.data_dir is not None and self.log is not None
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log), *args),
            check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``): clients see it go away."""
        self.pg_ctl("stop", "-m", "immediate", "-w", "-t", "60")

    def start(self) -> None:
        """Start the (stopped) server again on the same port; waits until it accepts logins."""
        self.pg_ctl("start", "-w", "-t", "120")

    def kill(self) -> None:
        """Stop for good: ``pg_ctl stop``, then SIGKILL the postmaster's process group."""
        if self.data_dir is None:
            return
        with contextlib.suppress(Exception):
            self.pg_ctl("stop", "-m", "immediate", "-w", "-t", "30", timeout=40)
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(Exception):
            pid = int(pid_file.read_text().split()[0])
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def _ensure_user() -> str:
    with contextlib.suppress(KeyError):
        import pwd

        pwd.getpwnam(PG_USER)
        return PG_USER
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return PG_USER


@contextlib.contextmanager
def running_server(bin_dir: Path) -> Iterator[PgServer]:
    """Start a server in a fresh temp dir; stop it and remove the dir when the block ends."""
    root = Path(tempfile.mkdtemp(prefix="stepchain-pg-"))
    as_user = _ensure_user() if os.geteuid() == 0 else None
    data = root / "data"
    server = PgServer("", data_dir=data, bin_dir=bin_dir, as_user=as_user)
    try:
        if as_user is not None:
            import pwd

            entry = pwd.getpwnam(as_user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
        subprocess.run(
            server._cmd("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync", "--locale=C"),
            check=True, capture_output=True, timeout=300, start_new_session=True,
        )  # fmt: skip
        # Password logins for one role (to test a wrong password); trust for everyone else.
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        port = _free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}'\n"
                "fsync = off\nfull_page_writes = off\n"
                "max_connections = 300\nshared_buffers = 32MB\n"
            )
        server.start()
        server.admin_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(server.admin_dsn, connect_timeout=5).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
