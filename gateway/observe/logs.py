"""Structured logs: ``--log-format json`` writes one JSON object per line.

Every record of every logger becomes ``{"ts", "level", "logger", "message", …}``; the gateway's
own events (logger ``stepchain.events``) add ``event`` and their fields::

    response.started    response_id, tenant, model
    response.finished   response_id, tenant, model, status, duration_ms, iterations,
                        input_tokens, output_tokens, cost_usd, error_type
    step.finished       response_id, step_id, tenant, kind, step_name (model or tool), state,
                        duration_ms, attempt, input_tokens, output_tokens, cost_usd, error_type
    upstream.retry      response_id, step_id, tenant, upstream, status, error_type, attempt
    error               response_id, tenant, error_type, error_message

Never a secret: no header values, keys, message contents or tool arguments — ids, names,
states, counts and timings only. Times: ``ts`` ISO 8601 UTC, durations milliseconds.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any

import orjson

__all__ = [
    "EVENT_LOGGER", "JSONFormatter", "configure_logging", "configure_text_logging", "event_logger",
]

EVENT_LOGGER = "stepchain.events"
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record (orjson), extra fields included, exceptions as text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(log_format: str, level: str = "info") -> None:
    """Route every log record to stderr: as JSON lines (``json``) or the usual text (``text``,
    where the gateway's events show at ``debug``). uvicorn's own loggers included."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = logging.getLevelName(level.upper()) if level.upper() != "TRACE" else 5
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Text logs keep the per-step events out of an operator's way unless asked for.
    logging.getLogger(EVENT_LOGGER).setLevel(
        logging.INFO if log_format == "json" else max(root.level, logging.INFO)
    )


def configure_text_logging(level: str = "info") -> None:
    """The default ``--log-format text`` beside uvicorn's own logging config: every other
    logger's records (the gateway's ``stepchain.*``, libraries' such as ``psycopg.pool``) go to
    stderr as ``WARNING:  stepchain.writer: message`` at ``level`` — without this they fell to
    Python's last-resort handler, as bare messages and only from WARNING up. uvicorn's loggers
    keep their handlers (they do not propagate to the root). The per-step events
    (:data:`EVENT_LOGGER`) show only at ``debug`` or ``trace``: at ``info`` an operator gets the
    gateway's warnings and notices, not a line per step (and the hot path skips building them).
    """
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = logging.getLevelName(level.upper()) if level.upper() != "TRACE" else 5
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    logging.getLogger(EVENT_LOGGER).setLevel(
        logging.INFO if root.level <= logging.DEBUG else logging.WARNING
    )


def event_logger() -> logging.Logger:
    return logging.getLogger(EVENT_LOGGER)
