"""A replica whose start-up fails because PostgreSQL went away after its store opened (a
database restart racing the replica's start, as in the chaos test) exits instead of hanging.

psycopg_pool's workers swallow a cancellation while they run a task (its reconnect attempts,
every moment the database is down), so a pool left open at exit kept ``asyncio.run`` waiting
for ever: the process printed "Application startup failed. Exiting." and stayed up. The
lifespan now closes the store whenever start-up fails. Real ``stepchain serve`` on real
PostgreSQL behind :class:`tests.chaos.commit_cut.CommitCutProxy`, which drops the connection
of the start-up's tool listing and then refuses every connection (the database "is down").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from gateway.testing.scripted_upstream import ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.chaos.commit_cut import proxy_in_thread
from tests.gateway.engine.test_retried_writes import _target, _via
from tests.gateway.harness import free_port, kill_process_group


def test_a_start_up_that_loses_the_database_after_opening_the_store_exits(pg_dsn, tmp_path):
    log = tmp_path / "gw.log"
    with proxy_in_thread(*_target(pg_dsn)) as proxy, \
            serve_app(create_scripted_upstream(ScriptedModel())) as upstream, open(log, "wb") as out:  # fmt: skip
        # The start-up's tool listing comes after the store opened (and after the command's
        # own check that the database answers).
        proxy.cut_after(b"SELECT definition FROM tools", then_refuse=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port()),
             "--log-level", "warning", "--db", _via(pg_dsn, proxy.port),
             "--upstream-base-url", f"{upstream}/v1"],
            env={**os.environ, "STEPCHAIN_ENCRYPTED_CONTENT_KEY": "mgIu3c1E_lBwzHjKc9Xl4y2yqsk1VnGm5ZKLL0x9Yyo="},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            try:
                code = proc.wait(timeout=90)  # a bound for a loaded machine: it exits in seconds
            except subprocess.TimeoutExpired:
                code = None
        finally:
            kill_process_group(proc)
        assert proxy.cuts == 1, log.read_text()
    text = log.read_text()
    assert code is not None, "the gateway did not exit after its start-up failed:\n" + text[-3000:]
    assert code != 0 and "startup failed" in text
