"""``--log-format text`` (the default): the gateway's own loggers and libraries' (psycopg's pool)
reach stderr with their level and name, at ``--log-level``; the per-step events only at debug.
Each case runs in a fresh interpreter, as ``stepchain serve`` configures it."""

from __future__ import annotations

import subprocess
import sys

SNIPPET = """
import logging, sys
from gateway.observe.logs import EVENT_LOGGER, configure_text_logging
configure_text_logging(sys.argv[1])
logging.getLogger("stepchain.writer").warning("response resp_1 waits for the store")
logging.getLogger("stepchain.writer").info("response resp_1: a retried write had committed")
logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1'")
logging.getLogger(EVENT_LOGGER).info("step.finished")
logging.getLogger("stepchain").debug("a debug line")
"""


def _stderr(level: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET, level], capture_output=True, text=True, timeout=60,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_text_logs_name_level_and_logger_at_the_log_level() -> None:
    assert _stderr("info") == [
        "WARNING:  stepchain.writer: response resp_1 waits for the store",
        "INFO:     stepchain.writer: response resp_1: a retried write had committed",
        "WARNING:  psycopg.pool: error connecting in 'pool-1'",
    ]
    assert _stderr("warning") == [
        "WARNING:  stepchain.writer: response resp_1 waits for the store",
        "WARNING:  psycopg.pool: error connecting in 'pool-1'",
    ]
    debug = _stderr("debug")
    assert "INFO:     stepchain.events: step.finished" in debug
    assert "DEBUG:    stepchain: a debug line" in debug
