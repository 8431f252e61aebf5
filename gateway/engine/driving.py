"""Running a prepared response to its stored result: create, loop, write, terminal event.

:class:`DrivingMixin` is the part of :class:`gateway.engine.service.ResponsesService` that
creates the response record (with its first model call), runs the loop with a
:class:`gateway.protocol.events.ResponseBuilder` observing it, and writes the final output,
usage and status *before* the builder emits the terminal event — so a ``GET`` right after the
stream ends returns the same response. It also resumes responses another process left
unfinished, and records ``generate: false`` ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import operator
import time
from typing import Any

from gateway.errors import to_gateway_error, upstream_error
from gateway.protocol.context_window import is_compaction_request
from gateway.protocol.events import ResponseBuilder
from gateway.protocol.usage import zero_usage
from store.types import (
    MODEL_CALL,
    Fence,
    FencedError,
    ResponseRecord,
    Step,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
)

from .chat import ENDPOINT as CHAT_ENDPOINT
from .live import LiveStream, LiveStreams
from .loop import LoopDeps, StepBudget, run_response_loop
from .preparing import Prepared
from .reading import record_to_object
from .transition import AppendSteps, next_action
from .writer import ResponseWriter

logger = logging.getLogger("stepchain.service")

__all__ = ["DrivingMixin"]


def _conversation_turn(
    prepared: Prepared, status: str, output: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]] | None:
    """``(conversation id, items)`` to append for a finished response: its new input items
    (those the conversation does not hold yet) and its output; None when nothing is appended
    (no conversation, or the response failed or was cancelled)."""
    if prepared.conversation_id is None or status not in ("completed", "incomplete"):
        return None
    held = {item.get("id") for item in prepared.history}
    items = [item for item in prepared.input_items if item.get("id") not in held]
    return prepared.conversation_id, items + output


def _response_error(error: dict[str, Any] | None) -> dict[str, Any]:
    """A failed step's ``{"type","message"}`` as the Response's ``{"code","message"}``."""
    error = error or {}
    kind = error.get("type") or "server_error"
    code = {
        "rate_limited": "rate_limit_exceeded",
        "insufficient_quota": "insufficient_quota",
    }.get(kind, "server_error")
    return {"code": code, "message": error.get("message") or kind}


def _taken_over(exc: BaseException) -> FencedError | None:
    """The FencedError that ``exc`` is, or one of those an exception group (nested or not)
    holds when it holds nothing else; None for any other exception."""
    if isinstance(exc, FencedError):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    fenced, rest = exc.split(FencedError)
    if fenced is None or rest is not None:
        return None
    while isinstance(fenced, BaseExceptionGroup):
        fenced = fenced.exceptions[0]
    return fenced  # type: ignore[return-value]


def _with_changes(deps: LoopDeps, changes: dict[str, Any]) -> LoopDeps:
    """``dataclasses.replace(deps, **changes)`` at a quarter of its cost (once per response)."""
    if not _DEPS_POSITIONAL:
        return dataclasses.replace(deps, **changes)
    copied = LoopDeps(*_deps_values(deps))
    for name, value in changes.items():
        setattr(copied, name, value)
    return copied


_DEPS_FIELDS = dataclasses.fields(LoopDeps)
_deps_values = operator.attrgetter(*(f.name for f in _DEPS_FIELDS))
_DEPS_POSITIONAL = all(f.init for f in _DEPS_FIELDS) and not hasattr(LoopDeps, "__post_init__")


class DrivingMixin:
    """Drives responses for :class:`ResponsesService` (which holds the attributes)."""

    deps: LoopDeps
    store: Any
    owner: str | None
    lease_s: float
    live: LiveStreams
    flush_s: float
    _cancel_requested: set[str]

    async def replay_chain(
        self, response_id: str, builder: ResponseBuilder, steps: list[Step] | None = None
    ) -> None:
        """Feed the finished steps of a response (``steps``, its whole chain; read from the
        store when None) to ``builder`` as the loop reported them: top-level steps in order
        (same item ids as the live stream), sub-agents' usage."""
        if steps is None:
            steps = await self.store.list_steps(response_id)
        for step in steps:
            if not step.finished:
                continue
            if step.scope_parent is not None or is_compaction_request(step.request_payload):
                if step.kind == MODEL_CALL:
                    builder.add_usage(step.usage)
            elif step.kind == MODEL_CALL:
                builder.model_call_finished(step)
            else:
                builder.tool_call_started(step)
                builder.tool_call_finished(step)

    async def run(
        self, prepared: Prepared, builder: ResponseBuilder, log: LiveStream | None = None
    ) -> dict[str, Any]:
        """Create the record, run the loop to its end, store the result, then emit the terminal
        event. Returns the final Response object. Raises StoreError only if the record itself
        cannot be created (nothing has run then)."""
        # The response, its first model call and its first events in one transaction.
        first = next_action(prepared.loop_request, [])
        assert isinstance(first, AppendSteps)
        fence = Fence(self.owner, 1) if self.owner is not None else None
        writer = ResponseWriter(self.store, prepared.record.id, fence, log, flush_s=self.flush_s)
        if log is not None:
            log.hold()
        builder.start()
        try:
            started = await writer.create_response(
                prepared.record, owner=self.owner, lease_s=self.lease_s, first_steps=first.steps
            )
        except BaseException:
            await writer.close()
            if log is not None:
                log.drop_staged()
                self.live.close(prepared.record.id, stream=log)
            raise
        return await self._drive(prepared, builder, writer, started)

    async def record_only(
        self, prepared: Prepared, builder: ResponseBuilder, log: LiveStream | None = None
    ) -> dict[str, Any]:
        """Store the response as ``completed`` with no output and no model call (WebSocket
        mode's ``generate: false``: request state for a later ``previous_response_id``), with
        its events (``log``) in the same write, and return the Response object."""
        completed_at = time.time()
        record = dataclasses.replace(
            prepared.record, status="completed", output=[], usage=zero_usage(),
            completed_at=completed_at,
        )
        if log is not None:
            log.hold()
        builder.start()
        final = builder.finish("completed", completed_at=completed_at)
        pending = log.pending() if log is not None else None
        try:
            await self.store.create_response(record, events=pending)
        except BaseException:
            if log is not None:
                log.drop_staged()
            raise
        finally:
            if log is not None:
                if pending is not None and log.staged:
                    log.committed(pending[0], len(pending[1]))
                self.live.close(record.id, stream=log)
        if record.store:
            self._remember(
                record.id, prepared.history_ids | {record.id},
                prepared.history + prepared.input_items,
                previous_id=record.previous_response_id, added=prepared.input_items,
            )
        return final

    async def resume(self, record: ResponseRecord) -> dict[str, Any]:
        """Finish a response another process left unfinished, from its chain in the store.

        Finished top-level steps are replayed into a fresh builder (same item ids as the live
        stream had), then the loop settles the interrupted steps and goes on.
        """
        logger.info("resuming response %s", record.id)
        writer = ResponseWriter(self.store, record.id, record.fence, flush_s=self.flush_s)
        if (record.metadata or {}).get("endpoint") == CHAT_ENDPOINT:
            # A passthrough call's client is gone with its process: nothing to resume it for.
            await self._cancel_unfinished(writer, record.id)
            error = {"code": "server_error", "message": "interrupted: the gateway process stopped"}
            await writer.update_response(
                record.id, status="failed", error=error, completed_at=time.time()
            )
            return record_to_object(record)
        try:
            prepared = await self._prepare(
                record.request, record.tenant, record.id, record.created_at, check=False
            )
        except StoreError:
            raise  # the store, not the request: the lease lapses and a later claim tries again
        except Exception as exc:  # the request cannot be rebuilt: end it, do not retry forever
            error = {"code": "server_error", "message": f"cannot resume: {exc}"}
            await writer.update_response(
                record.id, status="failed", error=error, completed_at=time.time()
            )
            return record_to_object(record)
        prepared.record = record
        builder = self.builder(prepared)
        logged = await writer.list_events(record.id)
        if logged:  # the items it showed keep their places, however many take-overs ago
            builder.adopt_log([event for _seq, event in logged])
        builder.start()  # no events: adds the listings' items to the output
        await self.replay_chain(record.id, builder)
        if logged:
            # It was streamed: go on with its durable log (sequence numbers continue).
            log = self.live.open(record.id)
            log.base = log.persisted = logged[-1][0] + 1
            writer = ResponseWriter(self.store, record.id, record.fence, log, flush_s=self.flush_s)
            builder.continue_stream(log.emit, [event for _seq, event in logged])
        if record.cancel_requested:
            return await self._end_cancelled(prepared, builder, writer)
        return await self._drive(prepared, builder, writer)

    async def _end_cancelled(
        self, prepared: Prepared, builder: ResponseBuilder, writer: ResponseWriter
    ) -> dict[str, Any]:
        """End a resumed response whose cancel was requested while nobody ran it."""
        return await self._drive(prepared, builder, writer, cancelled=True)

    async def _drive(
        self,
        prepared: Prepared,
        builder: ResponseBuilder,
        writer: ResponseWriter,
        started: list[Step] | None = None,
        *,
        cancelled: bool = False,
    ) -> dict[str, Any]:
        try:
            return await self._observed(prepared, builder, writer, started, cancelled)
        except FencedError:
            # Another process owns the response now: stop without writing anything more (a
            # hand-over, not a failure: no traceback).
            logger.warning(
                "response %s was taken over by another process; this process stops its loop",
                prepared.record.id,
            )
            if writer.log is not None:
                writer.log.drop_staged()
                self.live.close(prepared.record.id, stream=writer.log, handed_over=True)
            return record_to_object(prepared.record)
        finally:
            await writer.close()
            if writer.log is not None:
                self.live.close(prepared.record.id, stream=writer.log)

    async def _observed(
        self,
        prepared: Prepared,
        builder: ResponseBuilder,
        writer: ResponseWriter,
        started: list[Step] | None,
        cancelled: bool,
    ) -> dict[str, Any]:
        watch = self.deps.observer
        if watch is None:
            return await self._drive_loop(prepared, builder, writer, started, cancelled, None)
        record = prepared.record
        conversation = None
        if watch.tracing is not None:
            conversation = await self._conversation_root(record)
        with watch.response(
            record, conversation_id=conversation, parent_headers=prepared.trace_headers
        ) as scope:
            return await self._drive_loop(prepared, builder, writer, started, cancelled, scope)

    async def _drive_loop(
        self,
        prepared: Prepared,
        builder: ResponseBuilder,
        writer: ResponseWriter,
        started: list[Step] | None,
        cancelled: bool,
        scope: Any,
    ) -> dict[str, Any]:
        record = prepared.record
        iterations = 0
        base = self.deps
        used = len(started) if started is not None else len(await self.store.list_steps(record.id))
        changes: dict[str, Any] = {"store": writer, "step_budget": StepBudget(base.max_steps, used)}
        if prepared.upstream_key:
            changes["upstream"] = base.upstream.with_api_key(prepared.upstream_key)
        if prepared.mcp is not None and prepared.mcp.routes:
            changes["mcp_routes"] = prepared.mcp.routes
        deps = _with_changes(base, changes)
        error = incomplete = None
        last: Step | None = None  # the final model call, when the loop left storing it to us
        try:
            if cancelled:
                raise asyncio.CancelledError
            outcome = await run_response_loop(
                deps, record.id, prepared.loop_request, observer=builder, started=started,
                # The last step and the result share a write (its events wait for it).
                defer_final_write=True,
            )
        except asyncio.CancelledError:
            if not cancelled and record.id not in self._cancel_requested:
                raise  # shutting down: leave it in progress for another process to resume
            status, error = "cancelled", None
            await self._cancel_unfinished(writer, record.id)
        except FencedError:
            raise
        except StoreError as exc:
            logger.error("store error in response %s", record.id, exc_info=exc)
            status, error = "failed", {"code": "server_error", "message": f"store error: {exc}"}
            prepared.failure = to_gateway_error(exc)
        except Exception as exc:  # a bug must still end the response, never leave it in_progress
            fenced = _taken_over(exc)
            if fenced is not None:  # concurrent steps (a TaskGroup) all refused by the fence
                raise fenced from None
            logger.exception("response %s failed unexpectedly", record.id)
            status, error = "failed", {"code": "server_error", "message": "internal error"}
            prepared.failure = to_gateway_error(exc)
        else:
            last = outcome.unwritten
            iterations = outcome.iterations
            status = outcome.status
            if status == "failed":
                error = _response_error(outcome.error)
                failed = outcome.error or {}
                prepared.failure = upstream_error(
                    error["message"], kind=failed.get("type"), status=failed.get("status"),
                    param=failed.get("param"), code=failed.get("code"),
                )
            elif status == "incomplete":
                incomplete = {"reason": outcome.incomplete_reason}
        completed_at = time.time()
        output = builder.output
        if record.store:
            self._remember(
                record.id,
                prepared.history_ids | {record.id},
                prepared.history + prepared.input_items + output,
                previous_id=record.previous_response_id,
                added=prepared.input_items + output,
            )
        result = {
            "status": status,
            "output": output,
            "usage": builder.usage,
            "error": error,
            "incomplete_details": incomplete,
            "completed_at": completed_at,
        }
        turn = _conversation_turn(prepared, status, output)
        # The terminal event (and any held back) is stored with the result, in one write, and
        # reaches followers only once that write is done.
        log = writer.log
        resume_at = log.end if log is not None else 0
        if log is not None:
            log.hold()
        final = builder.finish(
            status, error=error, incomplete_details=incomplete, completed_at=completed_at
        )
        try:
            try:
                await self._write_result(writer, record.id, last, result, turn)
            except (StoreNotFoundError, StoreConflictError) as exc:
                if turn is None:
                    raise
                # The conversation was deleted meanwhile (or already holds an item id sent
                # again concurrently): the response's result is kept all the same.
                logger.warning("conversation %s: turn of response %s not added: %s",
                               turn[0], record.id, exc)
                await self._write_result(writer, record.id, last, result, None)
        except FencedError:
            raise
        except StoreError as exc:
            logger.error("could not store the result of response %s", record.id, exc_info=exc)
            status, error = "failed", {"code": "server_error", "message": f"store error: {exc}"}
            prepared.failure = to_gateway_error(exc)
            if log is not None:
                log.drop_staged()
            builder.rewind(resume_at)
            final = builder.finish("failed", error=error, completed_at=completed_at)
        if scope is not None:
            scope.finish(status, usage=builder.usage, error=error, iterations=iterations)
        return final

    async def _write_result(
        self,
        store: Any,
        response_id: str,
        last: Step | None,
        result: dict[str, Any],
        turn: tuple[str, list[dict[str, Any]]] | None,
    ) -> None:
        """The response's result (with its unwritten last model call, and its conversation
        turn) in one store transaction (``store``: the response's writer)."""
        extra = {} if turn is None else {"conversation_items": turn}
        if last is not None:
            await store.complete_step(
                last.id, last.response_payload, last.usage, upstream=last.upstream,
                response_update=result, **extra,
            )
        else:
            await store.update_response(response_id, **result, **extra)
