"""The one async store interface every backend implements (SQLite now, PostgreSQL later).

Nothing here is SQLite-specific: ids are made by the caller or by :func:`store.types.new_id`,
sequences are allocated by the store inside the same transaction that writes the steps, and
every method is a coroutine so a backend may use a thread, a pool or a native async driver.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from .types import ResponseRecord, Step, StepDescriptor


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
    ) -> list[Step]:
        """Insert a new response, and its ``first_steps`` already ``processing`` (as
        ``record_steps(..., start=True)``), in one transaction; returns those steps.

        ``owner`` (a process id string) holds the response's lease for ``lease_s`` seconds; a
        response whose lease runs out while queued or in progress may be claimed by another
        process (:meth:`claim_responses`). Raises StoreConflictError if the id exists.
        """

    @abc.abstractmethod
    async def claim_responses(
        self, owner: str, lease_s: float, *, limit: int = 100
    ) -> list[ResponseRecord]:
        """Atomically take over up to ``limit`` queued/in-progress responses whose lease has run
        out (or that have none), oldest first; each is leased to ``owner`` for ``lease_s``."""

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
    async def update_response(self, response_id: str, **fields: Any) -> None:
        """Set some of: status, output, usage, error, incomplete_details, completed_at, metadata.

        Raises StoreNotFoundError if the response does not exist, ValueError for another field name.
        """

    @abc.abstractmethod
    async def delete_response(self, response_id: str) -> bool:
        """Delete the response and all its steps; False if it did not exist."""

    @abc.abstractmethod
    async def list_responses(self, statuses: Sequence[str]) -> list[ResponseRecord]:
        """Every response whose status is one of ``statuses``, oldest first (for recovery)."""

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
        """One page of responses, newest first, and whether more follow: those of ``tenant``
        (None = the open gateway's) or of everyone with ``all_tenants``; optionally only one
        ``status`` or ``model``, ids containing ``search``, and those after the response id
        ``after`` (the previous page's last). ``limit`` 1–1000. StoreNotFoundError for an unknown
        ``after``."""

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
    ) -> list[Step]:
        """Append steps in state ``pending``, in one transaction, in the order given.

        The first step's ``prev_step_id`` is ``prev_step_id``; each later one points at the step
        before it in ``descriptors`` (parallel siblings are chained one after another). Each gets
        the next per-response ``sequence``. With ``start`` the steps are written already
        ``processing`` (attempt 1, ``started_at`` set): the pending → processing transition in
        the same transaction, for callers that run them at once. Raises StoreNotFoundError for an
        unknown response.
        """

    @abc.abstractmethod
    async def mark_processing(self, step_id: str) -> Step:
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
    ) -> Step:
        """processing → completed with its payload (and Chat Completions usage and the upstream
        that answered, for model calls). ``response_update`` sets those fields of the step's
        response (as :meth:`update_response`) in the same transaction: a response's last step
        and its result in one write."""

    @abc.abstractmethod
    async def fail_step(
        self, step_id: str, error: dict[str, Any], response_payload: Any = None
    ) -> Step:
        """pending|processing → failed with ``error`` = ``{"type", "message"}``.

        ``response_payload`` keeps whatever partial result there was (a model call's partial text).
        """

    @abc.abstractmethod
    async def cancel_step(self, step_id: str) -> Step:
        """pending|processing → canceled."""

    @abc.abstractmethod
    async def record_attempt(
        self, step_id: str, error: dict[str, Any] | None, upstream: str | None = None
    ) -> None:
        """Append one failed attempt's error to the step's ``attempts`` (None appends nothing)
        and set ``upstream`` when given."""

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
