"""Start-up failures caused by the database: one line on stderr naming it (never its password),
no traceback, exit status 2 — whether ``stepchain serve``'s own check finds it down or wrong, or
it goes away between that check and the app's start-up (a database restart racing the replica's
start, as in the chaos test).

psycopg_pool's workers swallow a cancellation while they run a task (its reconnect attempts,
every moment the database is down), so a pool left open at exit kept ``asyncio.run`` waiting
for ever: the process printed "Application startup failed. Exiting." and stayed up. The
lifespan now closes the store whenever start-up fails. Real ``stepchain serve`` on real
PostgreSQL behind :class:`tests.chaos.commit_cut.CommitCutProxy`, which makes the database look
down (every new connection closed at once) from a chosen moment on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from gateway.testing.scripted_upstream import ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.chaos.commit_cut import proxy_in_thread
from tests.gateway.engine.test_retried_writes import _target, _via
from tests.gateway.harness import free_port, kill_process_group
from tests.pg import PASSWORD_ROLE

PASSWORD = "hunter2-sekrit"
SEALING_KEY = "mgIu3c1E_lBwzHjKc9Xl4y2yqsk1VnGm5ZKLL0x9Yyo="


def _with_password(dsn: str, user: str = "postgres", password: str = PASSWORD) -> str:
    """``dsn`` logging in as ``user`` with ``password`` (the test server trusts ``postgres``:
    its password is sent, never checked)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def _serve(db: str, upstream: str, log: Path) -> int | None:
    """Run ``stepchain serve`` until it exits (None: still up after 90 s, then killed)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port()),
             "--log-level", "warning", "--db", db, "--upstream-base-url", f"{upstream}/v1"],
            env={**os.environ, "STEPCHAIN_ENCRYPTED_CONTENT_KEY": SEALING_KEY},
            stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
        )  # fmt: skip
        try:
            try:
                return proc.wait(timeout=90)  # a bound for a loaded machine: it exits in seconds
            except subprocess.TimeoutExpired:
                return None
        finally:
            kill_process_group(proc)


def _assert_one_line(code: int | None, stderr: str, *names: str) -> str:
    assert code == 2, f"exit status {code}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and PASSWORD not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("stepchain: db: cannot open postgresql://"), lines
    assert all(name in lines[-1] for name in names), lines[-1]
    return lines[-1]


def test_a_database_gone_between_the_check_and_the_app_start_up(pg_dsn, tmp_path):
    """The command's check opens and closes the store; the database goes away before the
    app's lifespan opens it again: one line, exit 2 (was: uvicorn's traceback, exit 3)."""
    log = tmp_path / "gw.log"
    with proxy_in_thread(*_target(pg_dsn)) as proxy, \
            serve_app(create_scripted_upstream(ScriptedModel())) as upstream:  # fmt: skip
        # The check's LISTEN connection is the last one its store closes.
        proxy.refuse_after_close(b"LISTEN ")
        db = _via(_with_password(pg_dsn), proxy.port)
        code = _serve(db, upstream, log)
        assert proxy.refusing
    stderr = log.read_text()
    _assert_one_line(code, stderr, f"127.0.0.1:{proxy.port}", urlsplit(pg_dsn).path[1:])
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_start_up_that_loses_the_database_after_opening_the_store_exits(pg_dsn, tmp_path):
    """The database goes away under the start-up's first reads (the tool listing, after the
    store opened): the process exits, with the one line and status 2."""
    log = tmp_path / "gw.log"
    with proxy_in_thread(*_target(pg_dsn)) as proxy, \
            serve_app(create_scripted_upstream(ScriptedModel())) as upstream:  # fmt: skip
        # The start-up's tool listing comes after the store opened (and after the command's
        # own check that the database answers).
        proxy.cut_after(b"SELECT definition FROM tools", then_refuse=True)
        code = _serve(_via(_with_password(pg_dsn), proxy.port), upstream, log)
        assert proxy.cuts == 1, log.read_text()
    assert code is not None, "the gateway did not exit after its start-up failed:\n" + log.read_text()
    # psycopg_pool may log its reconnect attempts before it (warnings, no traceback).
    _assert_one_line(code, log.read_text(), f"127.0.0.1:{proxy.port}")


@pytest.mark.parametrize(
    "user, password, dbname",
    [
        pytest.param(PASSWORD_ROLE, PASSWORD, None, id="wrong-password"),
        pytest.param("postgres", PASSWORD, "no_such_db", id="unknown-database"),
    ],
)
def test_a_live_server_that_refuses_the_login(pg_server, pg_dsn, tmp_path, user, password, dbname):
    """A wrong password, or a database that does not exist, on a running server."""
    if not pg_server.managed:
        pytest.skip("needs the test-managed server (a role with password logins)")
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_ROLE,)).fetchone():
            conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right-pw'")
    db = _with_password(pg_dsn, user, password)
    if dbname:
        db = db.rsplit("/", 1)[0] + f"/{dbname}"
    with serve_app(create_scripted_upstream(ScriptedModel())) as upstream:
        code = _serve(db, upstream, tmp_path / "gw.log")
    stderr = (tmp_path / "gw.log").read_text()
    line = _assert_one_line(code, stderr, urlsplit(db).netloc.rsplit("@", 1)[1])
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert ("password authentication failed" if not dbname else "does not exist") in line


def test_a_password_in_the_query_string_is_not_shown(tmp_path):
    """``?password=`` is redacted too (the server is unreachable: the check's line)."""
    db = f"postgresql://someone@127.0.0.1:1/nowhere?password={PASSWORD}"
    with serve_app(create_scripted_upstream(ScriptedModel())) as upstream:
        code = _serve(db, upstream, tmp_path / "gw.log")
    stderr = (tmp_path / "gw.log").read_text()
    _assert_one_line(code, stderr, "127.0.0.1:1", "nowhere")
    assert len(stderr.strip().splitlines()) == 1, stderr
