"""Chaos (issue 11): three ``stepchain serve`` replicas on one PostgreSQL server, 50 concurrent
streamed responses through the openai SDK, each a loop of four parallel HTTP tools; a random
replica is SIGKILLed every few seconds and started again, and the PostgreSQL server is restarted
once (``pg_ctl restart -m fast``). Clients whose replica died re-attach elsewhere with
``starting_after``. One run (module fixture), one test per guarantee, so a report names which hold.

The short form runs in the default test run (about a minute); ``STEPCHAIN_CHAOS_LONG=1`` runs the
long form (minutes of kills). ``python -m tests.chaos`` runs the same outside pytest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.run import LONG, SHORT, ChaosReport, run_chaos
from tests.pg import PgServer


@pytest.fixture(scope="module")
def report(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> ChaosReport:
    config = LONG if os.environ.get("STEPCHAIN_CHAOS_LONG", "") not in ("", "0") else SHORT
    work_dir: Path = tmp_path_factory.mktemp("chaos")
    result = run_chaos(config, work_dir, pg_server=pg_server)
    print(result.summary())
    return result


def test_the_chaos_happened(report: ChaosReport) -> None:
    """The run did what it claims: replicas died, streams re-attached, the database restarted."""
    assert report.backend == "postgres"
    assert len(report.kills) >= 4, report.summary()
    assert len({name for _, name in report.kills}) >= 2, report.summary()
    assert report.reattached, report.summary()
    assert not report.restart_failures, report.summary()
    expected = 1 if report.config.restart_database and report.database_restartable else 0
    assert report.database_restarts == expected, report.summary()
    assert len(report.responses) >= report.config.clients


def test_every_response_is_terminal(report: ChaosReport) -> None:
    """In the database and at every client: completed, failed, incomplete or cancelled."""
    assert not report.not_terminal, report.summary()
    assert sum(report.responses_by_status.values()) >= len(report.responses)


def test_no_step_is_left_processing(report: ChaosReport) -> None:
    assert report.steps_processing == 0, report.summary()
    assert report.steps_by_state.get("completed", 0) > 0


def test_no_non_idempotent_tool_call_runs_twice(report: ChaosReport) -> None:
    """From the tool server's log: a non-idempotent tool executed at most once per call."""
    assert report.tool_executions > 0
    assert not report.duplicate_executions, report.summary()


def test_reattached_streams_get_exactly_the_events_they_missed(report: ChaosReport) -> None:
    """Every stream, re-attached or not: sequence numbers 0..n-1, one terminal event (last), and
    the events concatenated over re-attachments equal a fresh full replay from another replica."""
    assert not report.stream_mismatches, report.summary()
