"""The vocabulary of the step-chain store: responses, steps, their states, and store errors.

A **response** is one ``POST /v1/responses``. A **step** is one model call or one tool call made
while producing it. Steps of one scope (the top level, or one sub-agent run) form a **chain**:
each step points at the step recorded just before it in the same scope (``prev_step_id``), and
every step of a response has a per-response ``sequence`` that strictly increases and is never
reused.

Error tree::

    StoreError                      any failure of the store itself (stops the loop)
    ├── StepStateError              an illegal state transition (completing a completed step, …)
    ├── StoreNotFoundError          a step, response or tool that does not exist
    └── StoreConflictError          a unique key taken already (a tool name, a response id)

All timestamps are Unix seconds as floats (UTC). Payloads are plain JSON values (dict/list/str/…).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODEL_CALL",
    "ResponseRecord",
    "STEP_STATES",
    "Step",
    "StepDescriptor",
    "StepStateError",
    "StoreConflictError",
    "StoreError",
    "StoreNotFoundError",
    "TOOL_CALL",
    "new_id",
]

# Step kinds.
MODEL_CALL = "model_call"
TOOL_CALL = "tool_call"

# Step states and the only transitions allowed between them.
PENDING, PROCESSING, COMPLETED, FAILED, CANCELED = (
    "pending",
    "processing",
    "completed",
    "failed",
    "canceled",
)
STEP_STATES = (PENDING, PROCESSING, COMPLETED, FAILED, CANCELED)
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({PROCESSING, FAILED, CANCELED}),
    PROCESSING: frozenset({COMPLETED, FAILED, CANCELED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}
FINISHED_STATES = frozenset({COMPLETED, FAILED, CANCELED})

# Response statuses (the Responses API's own).
RESPONSE_STATUSES = ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled")


class StoreError(Exception):
    """A failure of the store itself; the response loop stops on it."""


class StepStateError(StoreError):
    """A step state transition that the state machine does not allow."""


class StoreNotFoundError(StoreError):
    """The step, response or tool named does not exist."""


class StoreConflictError(StoreError):
    """A record with the same unique key exists already."""


_last_ms = 0
_counter = 0


def new_id(prefix: str) -> str:
    """An unguessable, sortable id: ``<prefix>_`` + 12 hex digits of milliseconds, 4 of a
    tie-breaking counter and 24 of fresh randomness (96 bits from ``secrets``), 40 in all.

    Ids made later in one process sort after earlier ones (the counter breaks ties within a
    millisecond), which keeps listings by id in creation order. Beyond that time prefix an id
    tells nothing: the random part is drawn anew for every id, so one id does not reveal another.
    """
    global _last_ms, _counter
    ms = int(time.time() * 1000)
    if ms <= _last_ms:
        _counter += 1
        ms = _last_ms
    else:
        _counter = 0
        _last_ms = ms
    return f"{prefix}_{ms:012x}{_counter & 0xFFFF:04x}{secrets.token_hex(12)}"


@dataclass(slots=True)
class StepDescriptor:
    """A step the transition function wants appended: its kind and its request payload.

    ``request_payload`` for a model call is the exact Chat Completions body to send upstream;
    for a tool call it is ``{"name", "call_id", "arguments"}`` with the model's own ``call_id``
    and the raw JSON arguments string the model produced.
    """

    kind: str
    request_payload: dict[str, Any]


@dataclass(slots=True)
class Step:
    """One recorded model call or tool call (a row of the ``steps`` table)."""

    id: str
    response_id: str
    scope_parent: str | None
    prev_step_id: str | None
    sequence: int
    kind: str
    state: str
    request_payload: dict[str, Any]
    response_payload: Any = None
    error: dict[str, Any] | None = None
    attempt: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    usage: dict[str, Any] | None = None
    # Per-attempt errors of retried model calls, and which upstream answered (issue 5).
    attempts: list[dict[str, Any]] = field(default_factory=list)
    upstream: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


@dataclass(slots=True)
class ResponseRecord:
    """One ``POST /v1/responses`` (a row of the ``responses`` table).

    ``request`` is the whole original request body, persisted so any process can resume the
    response. ``output`` is the list of final output items (Responses API shapes), ``usage`` the
    Responses usage object summed over all model calls.
    """

    id: str
    model: str
    request: dict[str, Any]
    tenant: str | None = None
    status: str = "in_progress"
    previous_response_id: str | None = None
    created_at: float = 0.0
    completed_at: float | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool = True
