"""The vocabulary of the step-chain store: responses, steps, their states, and store errors.

A **response** is one ``POST /v1/responses``. A **step** is one model call or one tool call made
while producing it. Steps of one scope (the top level, or one sub-agent run) form a **chain**:
each step points at the step recorded just before it in the same scope (``prev_step_id``), and
every step of a response has a per-response ``sequence`` that strictly increases and is never
reused.

Error tree::

    StoreError                      any failure of the store itself (stops the loop)
    ├── StepStateError              an illegal state transition (completing a completed step, …)
    ├── StoreNotFoundError          a step, response, tool or conversation that does not exist
    ├── StoreConflictError          a unique key taken already (a tool name, a response id)
    ├── FencedError                 the writer no longer owns the response (its fence is stale)
    └── StoreUnavailableError       the database cannot be reached (down, restarting, wrong
                                    password); retry later, nothing of the call was written

All timestamps are Unix seconds as floats (UTC). Payloads are plain JSON values (dict/list/str/…).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "StoreConflictError",
    "ConversationRecord",
    "Fence",
    "FencedError",
    "MODEL_CALL",
    "StoreNotFoundError",
    "ResponseRecord",
    "STEP_STATES",
    "Step",
    "StepDescriptor",
    "StepStateError",
    "StoreError",
    "StoreUnavailableError",
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


class FencedError(StoreError):
    """A write carried a :class:`Fence` that no longer matches the response's ``owner`` and
    ``owner_epoch``: another process has taken the response over. Nothing was written; the
    writer must stop working on that response (without side effects)."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or refused the login (server down or restarting, network
    gone, wrong password, pool exhausted for longer than the store's timeout). The message names
    host, port and database, never a password. Raised promptly (within the store's connect/pool
    timeout, a few seconds), and the store works again once the database is back. Nothing of
    the failed call was written — except when the connection broke while COMMIT was in flight,
    where no client of any database can know; fencing makes a retry of such a write safe."""


@dataclass(frozen=True, slots=True)
class Fence:
    """A fencing token: who owns a response (``owner``, a process id string) and since which
    take-over (``epoch``, :attr:`ResponseRecord.owner_epoch`). A write that carries a fence is
    applied only while the response still has exactly that owner and epoch."""

    owner: str
    epoch: int


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
    # Who runs it (a process id string) and its fencing epoch: 1 at create_response, +1 at
    # each claim_responses take-over. ``Fence(owner, owner_epoch)`` fences that owner's writes.
    owner: str | None = None
    owner_epoch: int = 0
    # Set by request_cancel (any replica); the owner observes it (wait_cancel) and stops.
    cancel_requested: bool = False

    @property
    def fence(self) -> Fence | None:
        """``Fence(owner, owner_epoch)``, or None for a response nobody owns."""
        return None if self.owner is None else Fence(self.owner, self.owner_epoch)


@dataclass(slots=True)
class ConversationRecord:
    """One conversation of the Conversations API (``conv_…``): its items are stored apart
    (:meth:`store.base.Store.add_conversation_items`). ``metadata`` is the API's string map
    (up to 16 pairs; the gateway validates it), ``created_at`` Unix seconds."""

    id: str
    tenant: str | None = None
    created_at: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
