"""Shared fixtures. Server helpers live in ``tests/servers.py`` (``from tests.servers import serve_app``);
the throwaway PostgreSQL server in ``tests/pg.py``.

Databases for any test:

- ``pg_dsn``: the DSN of a fresh, empty PostgreSQL database on a session-wide throwaway server
  (or on ``STEPCHAIN_TEST_PG_DSN``'s server when that is set). Without PostgreSQL binaries the
  test is skipped with one reason; with ``CI=true`` that is a failure instead.
- ``db_url``: parametrised ``sqlite`` / ``postgres``: an SQLite file path or a ``pg_dsn``, for
  suites that should run on both backends (``store.open_store(db_url)`` or ``--db db_url``).
- ``pg_server``: the :class:`tests.pg.PgServer` itself (``stop()``/``start()`` for outage tests;
  ``managed`` is False on an external server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PgServer, find_binaries, running_server
from tests.servers import ScriptedUpstream, serve_app, serve_scripted_upstream

__all__ = ["serve_app"]

_NO_POSTGRES = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
    "install Debian's postgresql package, or set STEPCHAIN_TEST_PG_DSN to a server's DSN"
)


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """A scripted Chat Completions server on 127.0.0.1: ``.base_url`` for clients, ``.model`` to
    queue Replies and read the requests it received."""
    with serve_scripted_upstream() as upstream:
        yield upstream


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
    """The DSN of a new, empty PostgreSQL database (``postgresql://postgres@127.0.0.1:PORT/NAME``)."""
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend: an SQLite file path, then a PostgreSQL DSN."""
    if request.param == "sqlite":
        return str(tmp_path / "stepchain.db")
    return request.getfixturevalue("pg_dsn")
