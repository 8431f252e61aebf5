"""The one async store interface every backend implements: :class:`store.sqlite.SQLiteStore`
(one host) and :class:`store.postgres.PostgresStore` (several replicas on one database).

Nothing here is backend-specific: ids are made by the caller or by :func:`store.types.new_id`,
sequences are allocated by the store inside the same transaction that writes the steps, and
every method is a coroutine so a backend may use a thread, a pool or a native async driver.

Common keyword arguments of the write methods (``create_response``, ``record_steps``,
``mark_processing``, ``complete_step``, ``fail_step``, ``cancel_step``, ``record_attempt``,
``update_response``):

- ``fence: Fence | None`` — checked in the write's own transaction: the write is applied only
  while the response's ``owner``/``owner_epoch`` equal the fence's, else FencedError and nothing
  is written. (Accepted by ``create_response`` for uniformity; a new response has no rival.)
- ``events: tuple[int, Sequence[bytes]] | None`` — ``(first_sequence, encoded events)``: SSE
  events with sequence numbers ``first_sequence, first_sequence + 1, …`` appended to the
  response's durable event log in the same transaction (see :meth:`Store.append_events`).
  ValueError for a negative first sequence or a non-bytes event; StoreConflictError for a sequence
  number the log has already (nothing written).

Errors: every method raises :class:`store.types.StoreError` or a subclass; a raised error means
nothing of that call was written (see :class:`store.types.StoreUnavailableError` for the one
exception no database client can avoid). ValueError for arguments that are wrong in themselves.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from .types import ConversationRecord, Fence, ResponseRecord, Step, StepDescriptor

Events = tuple[int, Sequence[bytes]] | None
Items = tuple[str, Sequence[dict[str, Any]]] | None


class Store(abc.ABC):
    """Durable storage of responses, their step chains, and registered tools.

    Every method raises :class:`store.types.StoreError` (or a subclass) on failure; a raised
    error means nothing of that call was written.
    """

    # -- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    # -- responses ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_response(
        self,
        response: ResponseRecord,
        *,
        owner: str | None = None,
        lease_s: float | None = None,
        first_steps: Sequence[StepDescriptor] = (),
        events: Events = None,
        fence: Fence | None = None,
    ) -> list[Step]:
        """Insert a new response, and its ``first_steps`` already ``processing`` (as
        ``record_steps(..., start=True)``), in one transaction; returns those steps.

        ``owner`` (a process id string; ``response.owner`` when None) holds the response's
        lease for ``lease_s`` seconds; the stored ``owner_epoch`` is 1 (so the writer's fence is
        ``Fence(owner, 1)``). A response whose lease runs out, or whose owner is registered
        (:meth:`register_owner`) and dead, may be claimed by another process
        (:meth:`claim_responses`). Raises StoreConflictError if the id exists.
        """

    @abc.abstractmethod
    async def claim_responses(
        self, owner: str, lease_s: float, *, limit: int = 100
    ) -> list[ResponseRecord]:
        """Atomically take over up to ``limit`` queued/in-progress responses, oldest first:
        those whose lease has run out (or that have none), and at once those of another owner
        that registered (:meth:`register_owner`) and is no longer alive. Each is leased to
        ``owner`` for ``lease_s`` seconds and its ``owner_epoch`` incremented: the returned
        records carry the new owner and epoch (``record.fence`` is the new writer's fence), and
        the previous owner's fenced writes fail with FencedError from then on. Two concurrent
        claimers never get the same response (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""

    @abc.abstractmethod
    async def renew_leases(self, owner: str, lease_s: float) -> int:
        """Extend every lease ``owner`` holds on an unfinished response; returns how many."""

    @abc.abstractmethod
    async def release_leases(self, owner: str) -> int:
        """Give up ``owner``'s leases on unfinished responses so any process may claim them now."""

    @abc.abstractmethod
    async def get_response(self, response_id: str) -> ResponseRecord | None:
        """The response, or None."""

    @abc.abstractmethod
    async def update_response(
        self,
        response_id: str,
        *,
        fence: Fence | None = None,
        events: Events = None,
        conversation_items: Items = None,
        **fields: Any,
    ) -> None:
        """Set some of: status, output, usage, error, incomplete_details, completed_at, metadata.

        ``conversation_items=(conversation_id, items)`` appends items to that conversation in
        the same transaction (as :meth:`add_conversation_items`). Setting ``status`` wakes
        :meth:`wait_events` followers. Raises StoreNotFoundError if the response (or conversation)
        does not exist, ValueError for another field name.
        """

    @abc.abstractmethod
    async def delete_response(self, response_id: str) -> bool:
        """Delete the response, all its steps and its event log; False if it did not exist."""

    @abc.abstractmethod
    async def list_responses(self, statuses: Sequence[str]) -> list[ResponseRecord]:
        """Every response whose status is one of ``statuses``, oldest first (for recovery)."""

    # -- steps -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def record_steps(
        self,
        response_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptors: Sequence[StepDescriptor],
        *,
        start: bool = False,
        fence: Fence | None = None,
        events: Events = None,
        ids: Sequence[str] | None = None,
    ) -> list[Step]:
        """Append steps in state ``pending``, in one transaction, in the order given.

        The first step's ``prev_step_id`` is ``prev_step_id``; each later one points at the step
        before it in ``descriptors`` (parallel siblings are chained one after another). Each gets
        the next per-response ``sequence``. With ``start`` the steps are written already
        ``processing`` (attempt 1, ``started_at`` set): the pending → processing transition in
        the same transaction, for callers that run them at once. ``ids`` (one distinct string
        per descriptor, e.g. ``new_id("step")``; None: the store makes them) are the steps'
        ids: a caller that retries the write after losing the connection during its COMMIT
        passes the same ids again and gets StoreConflictError if the first attempt was stored
        (nothing is written twice). Raises StoreNotFoundError for an unknown response,
        ValueError for ``ids`` of the wrong length or repeated.
        """

    @abc.abstractmethod
    async def mark_processing(
        self, step_id: str, *, fence: Fence | None = None, events: Events = None
    ) -> Step:
        """pending → processing; sets ``started_at`` and increments ``attempt``.

        Raises StepStateError from any other state, StoreNotFoundError for an unknown step.
        """

    @abc.abstractmethod
    async def complete_step(
        self,
        step_id: str,
        response_payload: Any,
        usage: dict[str, Any] | None = None,
        *,
        upstream: str | None = None,
        response_update: dict[str, Any] | None = None,
        fence: Fence | None = None,
        events: Events = None,
        conversation_items: Items = None,
    ) -> Step:
        """processing → completed with its payload (and Chat Completions usage and the upstream
        that answered, for model calls). ``response_update`` sets those fields of the step's
        response (as :meth:`update_response`) and ``conversation_items=(conversation_id,
        items)`` appends to a conversation, in the same transaction: a response's last step,
        its result and its conversation turn in one write."""

    @abc.abstractmethod
    async def fail_step(
        self,
        step_id: str,
        error: dict[str, Any],
        response_payload: Any = None,
        *,
        fence: Fence | None = None,
        events: Events = None,
    ) -> Step:
        """pending|processing → failed with ``error`` = ``{"type", "message"}``.

        ``response_payload`` keeps whatever partial result there was (a model call's partial text).
        """

    @abc.abstractmethod
    async def cancel_step(
        self, step_id: str, *, fence: Fence | None = None, events: Events = None
    ) -> Step:
        """pending|processing → canceled."""

    @abc.abstractmethod
    async def record_attempt(
        self,
        step_id: str,
        error: dict[str, Any] | None,
        upstream: str | None = None,
        *,
        fence: Fence | None = None,
        events: Events = None,
    ) -> None:
        """Append one failed attempt's error to the step's ``attempts`` (None appends nothing)
        and set ``upstream`` when given. An error with an ``"id"`` the step's attempts have
        already is not appended again (a retried write is a no-op)."""

    @abc.abstractmethod
    async def get_step(self, step_id: str) -> Step | None:
        """The step, or None."""

    @abc.abstractmethod
    async def list_chain(self, response_id: str, scope_parent: str | None = None) -> list[Step]:
        """The steps of one scope, by ``sequence``: top level when ``scope_parent`` is None,
        otherwise the sub-agent run started by that agent tool step. Never mixes scopes."""

    @abc.abstractmethod
    async def list_steps(self, response_id: str) -> list[Step]:
        """Every step of the response, all scopes, by ``sequence``."""

    @abc.abstractmethod
    async def list_unfinished_steps(self) -> list[Step]:
        """Every step in ``pending`` or ``processing``, all responses (for crash recovery)."""

    # -- tools -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_tool(self, tool: dict[str, Any]) -> None:
        """Insert a registered tool definition keyed by ``tool["name"]``; StoreConflictError if taken."""

    @abc.abstractmethod
    async def replace_tool(self, name: str, tool: dict[str, Any]) -> None:
        """Replace an existing tool definition; StoreNotFoundError if there is none."""

    @abc.abstractmethod
    async def get_tool(self, name: str) -> dict[str, Any] | None:
        """The tool definition, or None."""

    @abc.abstractmethod
    async def list_tools(self) -> list[dict[str, Any]]:
        """Every tool definition, by name."""

    @abc.abstractmethod
    async def delete_tool(self, name: str) -> bool:
        """Delete a tool definition; False if it did not exist."""

    # -- the durable event log ---------------------------------------------------------------

    @abc.abstractmethod
    async def append_events(
        self,
        response_id: str,
        first_sequence: int,
        events: Sequence[bytes],
        *,
        fence: Fence | None = None,
    ) -> None:
        """Append SSE events to the response's log: ``events[i]`` gets sequence number
        ``first_sequence + i``. Each event is stored byte-exact (whatever the caller encoded:
        typically one ``event: …\\ndata: {…}\\n\\n`` frame whose JSON carries the same
        ``sequence_number``), kept as long as the response (deleted with it and by
        :meth:`purge_before`), and wakes :meth:`wait_events` followers on every replica.

        Raises StoreNotFoundError for an unknown response, StoreConflictError when a sequence number is
        taken, FencedError for a stale fence, ValueError for non-bytes events; nothing written.
        """

    @abc.abstractmethod
    async def list_events(
        self, response_id: str, *, after: int = -1, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        """``(sequence_number, event bytes)`` with sequence number > ``after``, ascending, at
        most ``limit`` (None: all). An unknown response has none."""

    @abc.abstractmethod
    async def wait_events(self, response_id: str, after: int, timeout_s: float) -> None:
        """Return as soon as the log has an event with sequence number > ``after`` or the
        response is finished (status not queued/in_progress) or gone; else after ``timeout_s``
        seconds. Never raises on timeout: the caller re-reads (:meth:`list_events`,
        :meth:`get_response`) and decides. Wake-up latency after another replica's commit:
        PostgreSQL ``LISTEN/NOTIFY`` (milliseconds; a poll every ``poll_s`` while the listening
        connection is down); SQLite: at once for writes of the same store object, else a poll
        (every 10 ms by default)."""

    # -- liveness and cancellation -----------------------------------------------------------

    @abc.abstractmethod
    async def register_owner(self, owner: str) -> None:
        """Declare this process alive as ``owner`` until :meth:`release_owner`, :meth:`close`
        or its death (however it dies): :meth:`claim_responses` elsewhere takes a registered
        owner's unfinished responses at once when it is no longer alive, without waiting for
        leases. PostgreSQL: a session-level ``pg_advisory_lock`` held on a dedicated connection
        (re-taken if that connection is lost); SQLite: an ``flock`` on
        ``<db>-owners/<hash>.lock``. Idempotent; StoreConflictError if a live process holds ``owner``.
        """

    @abc.abstractmethod
    async def release_owner(self, owner: str) -> None:
        """Drop ``owner``'s liveness lock: from then on the owner counts as gone, as after its
        death, and :meth:`claim_responses` elsewhere takes its unfinished responses at once
        (call it after finishing or handing over what it runs). :meth:`close` releases every
        owner the store registered. Idempotent."""

    @abc.abstractmethod
    async def request_cancel(self, response_id: str) -> bool:
        """Set the response's ``cancel_requested`` flag (from any replica) and wake its
        owner's :meth:`wait_cancel`; False if the response does not exist. Idempotent."""

    @abc.abstractmethod
    async def wait_cancel(self, response_id: str, timeout_s: float | None = None) -> bool:
        """True as soon as a cancel was requested for the response (at once if it already
        was), False after ``timeout_s`` seconds (None: wait until cancelled, or until the task
        is cancelled). The owner runs it as a task beside the response's loop and cancels the
        task when the loop ends: cheap on both backends (PostgreSQL: fed by ``LISTEN``; SQLite:
        same-store requests wake it at once, other processes' within a 250 ms poll). An
        unknown response is never cancelled (waits, returns False on timeout)."""

    # -- conversations (the Conversations API) -------------------------------------------------

    @abc.abstractmethod
    async def create_conversation(
        self, conversation: ConversationRecord, items: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Insert a conversation and its first ``items`` (in order) in one transaction.

        Each item is a Conversations API item dict (``message``, ``function_call``, …) with its
        own string ``"id"``, stored as given. StoreConflictError if the id exists, ValueError for an
        item without an id or ids repeated."""

    @abc.abstractmethod
    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation, or None."""

    @abc.abstractmethod
    async def update_conversation(
        self, conversation_id: str, metadata: dict[str, Any]
    ) -> ConversationRecord:
        """Replace the conversation's metadata; returns the updated record. StoreNotFoundError."""

    @abc.abstractmethod
    async def delete_conversation(self, conversation_id: str) -> bool:
        """Delete the conversation and its items; False if it did not exist. Responses that
        used it are untouched."""

    @abc.abstractmethod
    async def add_conversation_items(
        self, conversation_id: str, items: Sequence[dict[str, Any]]
    ) -> None:
        """Append items after the existing ones, in the order given, in one transaction.
        StoreNotFoundError for an unknown conversation, StoreConflictError for an item id the
        conversation has already, ValueError for an item without an id."""

    @abc.abstractmethod
    async def list_conversation_items(
        self,
        conversation_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: str = "desc",
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of items: ``order="desc"`` newest first (the API's default), ``"asc"`` oldest
        first; ``after`` an item id (the page starts after it in that order); at most ``limit``
        (1–1000). Returns ``(items, has_more)``. StoreNotFoundError for an unknown conversation or
        ``after`` id; ValueError for a bad limit or order."""

    @abc.abstractmethod
    async def get_conversation_item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        """The item, or None (also for an unknown conversation)."""

    @abc.abstractmethod
    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        """Delete one item; False if there was none."""

    # -- listing and retention ---------------------------------------------------------------

    @abc.abstractmethod
    async def list_responses_page(
        self,
        *,
        tenant: str | None = None,
        all_tenants: bool = False,
        status: str | None = None,
        model: str | None = None,
        search: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> tuple[list[ResponseRecord], bool]:
        """A page of responses, newest first (``created_at`` then id, descending): those of
        ``tenant`` (None: responses without a tenant) unless ``all_tenants``; filtered by exact
        ``status`` and ``model``, and by ``search`` (a substring of the id) when given; the
        page starts after response ``after``; at most ``limit`` (1–1000). Returns
        ``(records, has_more)``. StoreNotFoundError for an unknown ``after`` id."""

    @abc.abstractmethod
    async def purge_before(self, timestamp: float) -> int:
        """Delete every finished response (status not queued/in_progress) created before
        ``timestamp`` (Unix seconds), with its steps and events; returns how many responses.
        Conversations and tools are kept."""
