"""Retries and fallback upstreams around :class:`~executors.upstream.UpstreamClient`.

:class:`ResilientUpstream` runs one model call against an ordered list of
:class:`UpstreamTarget` s. On each target, a *transient* failure is retried with backoff
(tenacity), as long as no piece of the answer has been passed on yet (``on_delta``/``on_chunk``
not called: once the client has seen text, a second answer cannot be spliced in)::

    transient   HTTP 429 (not insufficient_quota), 408, 5xx, connection errors, timeouts,
                a stream cut off before anything was passed on
    final       insufficient_quota, any other 4xx, an error object in a 200 body or chunk,
                invalid JSON, and every failure after something was passed on

A target gets ``max_retries`` retries within ``retry_max_s`` seconds (its own budget). The wait
before a retry is the server's ``Retry-After``/``retry-after-ms`` when given, otherwise exponential
backoff with jitter (0.25 s doubling, at most 8 s), capped by what remains of the budget; a server
asking for longer than what remains ends the retries on that target. When a target's retries run
out on transient failures, the next target is tried (with its ``model``, if it sets one); when all
fail, the last error is raised. Final failures are raised at once, with no fallback.

Every attempt is reported through ``on_attempt(error, label)``: the error as
``{"type", "message", "status"}`` after each failed attempt, and ``None`` once with the label of
the target that answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import tenacity

from executors.reassembly import Delta
from executors.upstream import UpstreamClient, UpstreamError

__all__ = ["OnAttempt", "ResilientUpstream", "UpstreamTarget"]

OnAttempt = Callable[[dict[str, Any] | None, str], Awaitable[None]]

# Failure kinds worth another try, or another upstream, when nothing was passed on yet.
_TRANSIENT_TYPES = frozenset(
    {"rate_limited", "upstream_timeout", "upstream_connection_error", "stream_cut"}
)
# Exponential backoff when the server gives no delay: 0.25 s, 0.5 s, 1 s, … at most 8 s,
# plus up to 0.25 s of jitter so that many clients do not retry in step.
_BACKOFF = tenacity.wait_exponential(multiplier=0.25, max=8.0) + tenacity.wait_random(0, 0.25)


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One Chat Completions upstream: its base URL (e.g. ``https://api.openai.com/v1``), key,
    the model name to send instead of the request's (for a fallback serving another model), and
    the label a step records as its ``upstream`` (default: the base URL). ``pass_client_key``:
    whether a client's own key (setting ``pass_client_key``) may be sent to it — true for the
    primary; a fallback, often another provider, keeps its own key unless marked."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    label: str = ""
    pass_client_key: bool = True


def _label(target: UpstreamTarget) -> str:
    return target.label or target.base_url


def _transient(exc: UpstreamError) -> bool:
    """A failure that another attempt (or another upstream) may not have."""
    if exc.type == "insufficient_quota":
        return False
    if exc.type in _TRANSIENT_TYPES:
        return True
    return exc.status is not None and (exc.status >= 500 or exc.status == 408)


def _attempt_error(exc: UpstreamError) -> dict[str, Any]:
    return {"type": exc.type, "message": exc.message, "status": exc.status}


class ResilientUpstream:
    """Model calls with retries and fallbacks over ``targets`` (tried in order; at least one).

    ``client`` is shared and not closed by :meth:`aclose` when given; ``transport``, the one it
    sends through, lets model calls skip the client's per-request work. Times are seconds; the
    timeouts apply to each attempt (see :mod:`executors.upstream`). ``sleep`` is awaited with the
    seconds to wait before each retry (a test hook).
    """

    def __init__(
        self,
        targets: Sequence[UpstreamTarget],
        *,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int = 3,
        retry_max_s: float = 60.0,
        connect_timeout: float = 10.0,
        first_byte_timeout: float | None = 120.0,
        idle_timeout: float = 120.0,
        total_timeout: float | None = 1800.0,
        read_timeout: float = 600.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not targets:
            raise ValueError("ResilientUpstream needs at least one upstream target")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        self._targets = tuple(targets)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        )
        self._timeouts = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "idle_timeout": idle_timeout,
            "first_byte_timeout": first_byte_timeout,
            "total_timeout": total_timeout,
        }
        self._transport = transport
        self._calls = tuple(
            UpstreamClient(
                t.base_url, t.api_key, client=self._client, transport=transport, **self._timeouts
            )
            for t in self._targets
        )
        self._max_retries = max_retries
        self._retry_max_s = retry_max_s
        self._sleep = sleep

    @property
    def targets(self) -> tuple[UpstreamTarget, ...]:
        """The upstreams, in the order they are tried."""
        return self._targets

    def with_api_key(self, api_key: str | None) -> ResilientUpstream:
        """A view sharing this one's HTTP client and settings that sends ``api_key`` (None: no
        ``Authorization`` header) instead of the target's own key to every target marked
        ``pass_client_key``; the others keep their own keys."""
        return ResilientUpstream(
            [
                dataclasses.replace(t, api_key=api_key) if t.pass_client_key else t
                for t in self._targets
            ],
            client=self._client,
            transport=self._transport,
            max_retries=self._max_retries,
            retry_max_s=self._retry_max_s,
            sleep=self._sleep,
            **self._timeouts,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self._client.aclose()

    async def get(self, path: str) -> httpx.Response:
        """``GET {base_url}/{path}`` on the first target that can be reached (any status).

        Falls back to the next target on connection errors and timeouts; raises the last
        UpstreamError when none can be reached.
        """
        last: UpstreamError | None = None
        for call in self._calls:
            try:
                return await call.get(path)
            except UpstreamError as exc:
                if exc.type not in ("upstream_connection_error", "upstream_timeout"):
                    raise
                last = exc
        assert last is not None
        raise last

    async def post(self, path: str, body: Any) -> httpx.Response:
        """``POST`` JSON to the first target (see :meth:`UpstreamClient.post`), no retries:
        for auxiliary endpoints such as vLLM's ``/tokenize``. Raises UpstreamError."""
        return await self._calls[0].post(path, body)

    async def chat_completion(
        self,
        body: dict[str, Any],
        *,
        on_delta: Callable[[Delta], Awaitable[None]] | None = None,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        on_attempt: OnAttempt | None = None,
    ) -> dict[str, Any]:
        """Run one model call (see :meth:`UpstreamClient.chat_completion`) with retries and
        fallbacks as the module docstring describes; returns the ``chat.completion`` dict.

        Raises UpstreamError: the first final failure, or the last target's last failure. An
        exception raised by a callback propagates unchanged and is not retried.
        """
        forwarded = False
        delta_cb, chunk_cb = on_delta, on_chunk
        if on_delta is not None:

            async def delta_cb(delta: Delta) -> None:
                nonlocal forwarded
                forwarded = True
                await on_delta(delta)

        if on_chunk is not None:

            async def chunk_cb(chunk: dict[str, Any]) -> None:
                nonlocal forwarded
                forwarded = True
                await on_chunk(chunk)

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, UpstreamError) and not forwarded and _transient(exc)

        last: UpstreamError | None = None
        for index, (target, call) in enumerate(zip(self._targets, self._calls)):
            label = _label(target)
            sent = body if target.model is None else {**body, "model": target.model}
            first_failure: UpstreamError | None = None
            if index == 0:
                # Most calls succeed at once: only a failure pays for the retry machinery, which
                # then starts from this attempt's outcome (same waits, same attempt count).
                try:
                    completion = await call.chat_completion(sent, on_delta=delta_cb, on_chunk=chunk_cb)
                except UpstreamError as exc:
                    if on_attempt is not None:
                        await on_attempt(_attempt_error(exc), label)
                    if not retryable(exc):
                        raise
                    first_failure = exc
                else:
                    if on_attempt is not None:
                        await on_attempt(None, label)
                    return completion
            try:
                async for attempt in self._retrying(retryable):
                    with attempt:
                        if first_failure is not None:
                            exc, first_failure = first_failure, None
                            raise exc  # the fast path's attempt, as tenacity's first
                        try:
                            completion = await call.chat_completion(
                                sent, on_delta=delta_cb, on_chunk=chunk_cb
                            )
                        except UpstreamError as exc:
                            if on_attempt is not None:
                                await on_attempt(_attempt_error(exc), label)
                            raise
            except UpstreamError as exc:
                if not retryable(exc):
                    raise
                last = exc  # this target stays down: try the next one
                continue
            if on_attempt is not None:
                await on_attempt(None, label)
            return completion
        assert last is not None
        raise last

    def _retrying(self, retryable: Callable[[BaseException], bool]) -> tenacity.AsyncRetrying:
        """One target's retry loop: ``max_retries`` retries within ``retry_max_s`` seconds."""
        budget = self._retry_max_s
        max_attempts = self._max_retries + 1

        def used(state: tenacity.RetryCallState) -> float:
            # idle_for counts the waits even when the sleep hook does not really sleep.
            return max(state.seconds_since_start or 0.0, state.idle_for)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            server_delay = exc.retry_after if isinstance(exc, UpstreamError) else None
            if server_delay is not None:
                return server_delay  # longer than the budget left: stop() gives up
            return min(_BACKOFF(state), max(budget - used(state), 0.0))

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= max_attempts or used(state) >= budget:
                return True
            return used(state) + state.upcoming_sleep > budget

        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(retryable),
            wait=wait,
            stop=stop,
            sleep=self._sleep,
            reraise=True,
        )
