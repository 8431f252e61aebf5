"""Shared fixtures. Server helpers live in ``tests/servers.py`` (``from tests.servers import serve_app``);
the throwaway PostgreSQL server in ``tests/pg.py``.

Databases for any test:

- ``pg_dsn``: the URL (``postgresql://postgres@127.0.0.1:PORT/NAME``) of a fresh, empty PostgreSQL
  database on a session-wide throwaway server (or on ``STEPCHAIN_TEST_PG_DSN``'s server when that
  is set). Without PostgreSQL binaries the test is skipped with one reason; with ``CI=true`` that
  is a failure instead.
- ``db_url``: parametrised ``sqlite`` / ``postgres``: an SQLite file path or a ``pg_dsn``, for
  suites that should run on both backends (``store.open_store(db_url)`` or ``--db db_url``).
- ``backend`` / ``module_db`` / ``on_both_backends``: end-to-end modules on both backends (below).
- ``pg_server``: the :class:`tests.pg.PgServer` itself (``stop()``/``start()`` for outage tests;
  ``managed`` is False on an external server).

``no_process_left_behind`` (every session): the test run is made a child subreaper, so a process
orphaned by a test (a uvicorn worker whose parent was killed, a daemonised server) becomes a child
of the run instead of init; at the end of the session any child still running fails the run,
after being killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PgServer, find_binaries, running_server
from tests.servers import ScriptedUpstream, serve_app, serve_scripted_upstream

__all__ = ["serve_app"]

_PR_SET_CHILD_SUBREAPER = 36
_NO_POSTGRES = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
    "install Debian's postgresql package, or set STEPCHAIN_TEST_PG_DSN to a server's URL"
)


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """A scripted Chat Completions server on 127.0.0.1: ``.base_url`` for clients, ``.model`` to
    queue Replies and read the requests it received."""
    with serve_scripted_upstream() as upstream:
        yield upstream


def child_processes(parent: int) -> dict[int, str]:
    """``{pid: command line}`` of the running (not zombie) children of ``parent``; reaps the
    zombies among them when ``parent`` is this process."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) != parent:
            continue
        if state == "Z":
            if parent == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry.name), os.WNOHANG)
            continue
        children[int(entry.name)] = cmdline.strip()
    return children


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the session when a test left a process running (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    left = child_processes(os.getpid())
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in left:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    assert not left, f"processes left running by the tests (killed now): {left}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (started on first use, stopped at the end)."""
    external = os.environ.get("STEPCHAIN_TEST_PG_DSN")
    if external:
        yield PgServer(external)
        return
    bin_dir = find_binaries()
    if bin_dir is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(_NO_POSTGRES + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(_NO_POSTGRES)
    with running_server(bin_dir) as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The URL of a new, empty PostgreSQL database (``postgresql://postgres@127.0.0.1:PORT/NAME``)."""
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend: an SQLite file path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "stepchain.db")
    return request.getfixturevalue("pg_dsn")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """``"sqlite"``, then ``"postgres"``: the store backend of a module's end-to-end tests. Module
    scope, so that a module-scoped gateway (:func:`module_db`) and the module's tests agree."""
    return request.param


@pytest.fixture(scope="module")
def module_db(backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh database for a module-scoped gateway on :func:`backend`: an SQLite file path or the
    URL of a new PostgreSQL database (``running_gateway(tmp, db=module_db)``, ``--db module_db``)."""
    if backend == "sqlite":
        return str(tmp_path_factory.mktemp("db") / "stepchain.db")
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def on_both_backends(backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice: ``running_gateway`` on a fresh SQLite file, then on a fresh PostgreSQL
    database (``pytestmark = pytest.mark.usefixtures("on_both_backends")`` in a module). The
    backend is :func:`backend`'s, so a module-scoped gateway on :func:`module_db` matches it."""
    if backend == "postgres":
        from tests.gateway import harness

        monkeypatch.setattr(harness, "database_url", request.getfixturevalue("pg_dsn"))
    return backend


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_per_module() -> Iterator[None]:
    """Collect garbage after each test module, so an object a module left open (a socket, a
    client) is reported — warnings are errors — in that module's last test, not at random later."""
    yield
    import gc

    gc.collect()
