"""The upstream Chat Completions client: one model call, streamed and reassembled, or plain.

:class:`UpstreamClient` posts to ``{base_url}/chat/completions`` over one shared, pooled
``httpx.AsyncClient``. A streaming body (``"stream": true``) is read with httpx-sse; each chunk is
parsed with orjson, handed to ``on_chunk``, fed to a :class:`~executors.reassembly.Reassembler`, and
its Deltas handed to ``on_delta`` as they arrive; the call returns the reassembled completion.

Every failure is an :class:`UpstreamError`; httpx exceptions are translated in one place
(:func:`_from_httpx`, ``raise … from exc``). ``UpstreamError.type``::

    upstream_error              a non-2xx status (not 429), or an ``error`` object in a body or chunk
    context_length_exceeded     HTTP 400 saying the prompt is longer than the model's context
    rate_limited                HTTP 429
    insufficient_quota          HTTP 429 whose error code/type is ``insufficient_quota``
    upstream_timeout            a timeout: connect, read, first byte, idle (no bytes for
                                ``idle_timeout`` s while streaming) or total; the message names it
                                and its value
    upstream_connection_error   connection refused/reset before an answer, bad URL, protocol error
    stream_cut                  the stream broke off (or ended) before the answer finished
    invalid_upstream_response   a body or chunk that is not the JSON object it should be

Timeouts, in seconds (``first_byte_timeout`` and ``total_timeout`` may be None: no limit):
``connect_timeout`` to open the connection; ``read_timeout`` for any one read;
``first_byte_timeout`` from sending the request to the first SSE event (or, not streamed, the
whole JSON body); ``idle_timeout`` between reads of a stream; ``total_timeout`` for the whole
answer, stream included.

A stream that fails after it started keeps what arrived in ``UpstreamError.partial``. Once the answer
is finished (choice 0 had a ``finish_reason``, or ``[DONE]`` arrived) a failure while reading the
rest (the usage chunk, the end of the body) does not fail the call.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
# httpx-sse's I/O-free decoders, fed straight from the body (see _sse_batches).
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from executors.reassembly import Delta, Reassembler, StreamCutError

__all__ = ["STEP_NOTES", "UpstreamClient", "UpstreamError"]

#: A key of a model call's request payload that holds the gateway's notes on the step (e.g. the
#: request's tools it left out); stripped from the body sent upstream.
STEP_NOTES = "stepchain"

# How much of a non-JSON error body goes into the message.
_SNIPPET_CHARS = 500


class UpstreamError(Exception):
    """A failed model call; ``message`` (also ``str(exc)``) is what a person or model should see.

    ``status`` is the upstream HTTP status if there was one, ``type`` one of the kinds in the module
    docstring, ``partial`` the completion reassembled so far when a stream broke mid-way, ``body``
    the upstream error body (parsed JSON, else text), ``retry_after`` seconds from ``Retry-After``
    or ``retry-after-ms``.
    """

    def __init__(
        self,
        message: str,
        *,
        type: str = "upstream_error",
        status: int | None = None,
        partial: dict[str, Any] | None = None,
        body: dict[str, Any] | str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.status = status
        self.partial = partial
        self.body = body
        self.retry_after = retry_after


class UpstreamClient:
    """Calls one Chat Completions upstream at ``base_url`` (e.g. ``https://api.openai.com/v1``).

    ``client`` is shared and not closed by :meth:`aclose` when given; otherwise one is created with
    pooled connections. Timeouts are seconds (see the module docstring); ``None`` turns off
    ``first_byte_timeout`` and ``total_timeout``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        idle_timeout: float = 120.0,
        first_byte_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._url = self.base_url + "/chat/completions"
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        )
        # ``transport`` (the one ``client`` sends through) lets model calls skip the client's
        # per-request auth, redirect and cookie handling, which a model call never needs.
        self._transport = transport
        self._parsed_url = httpx.URL(self._url)  # parsed once, not per call
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._timeout_extension = self._timeout.as_dict()
        self._idle_timeout = idle_timeout
        self._first_byte_timeout = first_byte_timeout
        self._total_timeout = total_timeout
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        self._sse_headers = {**headers, "Accept": "text/event-stream", "Cache-Control": "no-store"}
        # Model calls through ``transport``: complete request headers but Content-Length, built
        # once (httpx would normalise the dict and add Host on every request).
        host = [("Host", self._parsed_url.netloc.decode("ascii"))]
        self._plain_request_headers = httpx.Headers(host + list(headers.items()))
        self._sse_request_headers = httpx.Headers(host + list(self._sse_headers.items()))

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self._client.aclose()

    async def get(self, path: str) -> httpx.Response:
        """``GET {base_url}/{path}`` (e.g. ``"models"``), read in full, any status; UpstreamError on
        a transport failure."""
        try:
            return await self._client.get(
                self.base_url + "/" + path.lstrip("/"), headers=self._headers, timeout=self._timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _from_httpx(exc, started=False, partial=None, timeout=self._timeout) from exc

    async def post(self, path: str, body: Any) -> httpx.Response:
        """``POST`` ``body`` as JSON to ``{base_url}/{path}``, or with a leading ``/`` to that path
        on the server's root (``"/tokenize"``); read in full, any status; UpstreamError on a
        transport failure."""
        url = httpx.URL(self.base_url)
        target = url.copy_with(raw_path=path.encode()) if path.startswith("/") else httpx.URL(
            self.base_url + "/" + path
        )
        try:
            return await self._client.post(
                target, content=orjson.dumps(body), headers=self._headers, timeout=self._timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _from_httpx(exc, started=False, partial=None, timeout=self._timeout) from exc

    async def chat_completion(
        self,
        body: dict[str, Any],
        *,
        on_delta: Callable[[Delta], Awaitable[None]] | None = None,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        on_attempt: Callable[[dict[str, Any] | None, str], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Run one model call with ``body`` (a Chat Completions request); return the
        ``chat.completion`` dict (reassembled when ``body["stream"]`` is true, in which case
        ``on_chunk`` gets every raw chunk and ``on_delta`` every Delta as they arrive).

        ``on_attempt(error, base_url)`` is awaited once: with ``{"type", "message", "status"}``
        on failure, with ``None`` on success (the same hook as
        :meth:`executors.resilience.ResilientUpstream.chat_completion`, which makes several
        attempts). Raises UpstreamError.
        """
        if on_attempt is None:
            return await self._call(body, on_delta, on_chunk)
        try:
            completion = await self._call(body, on_delta, on_chunk)
        except UpstreamError as exc:
            await on_attempt({"type": exc.type, "message": exc.message, "status": exc.status},
                             self.base_url)
            raise
        await on_attempt(None, self.base_url)
        return completion

    async def _call(
        self,
        body: dict[str, Any],
        on_delta: Callable[[Delta], Awaitable[None]] | None,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None,
    ) -> dict[str, Any]:
        if STEP_NOTES in body:  # the gateway's notes on the step, never sent upstream
            body = {key: value for key, value in body.items() if key != STEP_NOTES}
        payload = orjson.dumps(body)
        if body.get("stream"):
            return await self._stream(payload, on_delta, on_chunk)
        # Not streamed, the JSON body is the first byte: it must arrive within both limits.
        which, limit = _first_limit(self._first_byte_timeout, self._total_timeout)
        timer = None
        try:
            async with asyncio.timeout(limit) as timer:
                async with self._post(payload, False) as response:
                    await response.aread()
        except TimeoutError as exc:
            if timer is None or not timer.expired():
                raise
            raise _timeout_error(which, limit, None) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _from_httpx(exc, started=False, partial=None, timeout=self._timeout) from exc
        if not 200 <= response.status_code < 300:
            raise _status_error(response)
        return _parse_completion(response.content)

    @contextlib.asynccontextmanager
    async def _post(self, payload: bytes, sse: bool) -> AsyncIterator[httpx.Response]:
        """POST ``payload`` to the chat completions URL (asking for SSE if ``sse``); the response
        body is not read yet."""
        if self._transport is None:
            async with self._client.stream(
                "POST", self._url, content=payload, timeout=self._timeout,
                headers=self._sse_headers if sse else self._headers,
            ) as response:
                yield response
            return
        prepared = httpx.Headers(self._sse_request_headers if sse else self._plain_request_headers)
        prepared["Content-Length"] = str(len(payload))
        request = httpx.Request(
            "POST", self._parsed_url, headers=prepared, stream=httpx.ByteStream(payload),
            extensions={"timeout": self._timeout_extension},
        )
        request.read()  # the body is in memory: the transport sends it as bytes
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    async def _stream(
        self,
        payload: bytes,
        on_delta: Callable[[Delta], Awaitable[None]] | None,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None,
    ) -> dict[str, Any]:
        reassembler = Reassembler()
        saw_done = False
        started = False
        first_event = False
        timer = None
        watch = None
        loop = asyncio.get_running_loop()
        which, limit = _first_limit(self._first_byte_timeout, self._total_timeout)
        total_at = None if self._total_timeout is None else loop.time() + self._total_timeout
        try:
            async with asyncio.timeout_at(None if limit is None else loop.time() + limit) as timer:
                async with self._post(payload, True) as response:
                    if not 200 <= response.status_code < 300:
                        await response.aread()
                        raise _status_error(response)
                    started = True
                    headers = response.headers
                    if "text/event-stream" not in headers.get("content-type", ""):
                        # A server that ignored "stream": it answered with one JSON completion.
                        completion = _parse_completion(await response.aread())
                        batches: Any = _one_batch(_chunk_of(completion))
                    else:
                        watch = _IdleWatch(timer, self._idle_timeout)
                        encoding = headers.get("content-encoding", "identity").strip().lower()
                        # The raw body unless it is compressed (then httpx decodes it).
                        body = response.stream if encoding == "identity" else response.aiter_bytes()
                        batches = _sse_batches(body, watch)
                    async with contextlib.aclosing(batches):
                        async for batch in batches:
                            if not first_event:
                                first_event = True  # from now on only the total limit is left
                                if timer.when() != total_at:
                                    timer.reschedule(total_at)
                            for data in batch:
                                if saw_done or not data:
                                    continue  # read on to the end: the connection is reused
                                if data.startswith("[DONE]"):
                                    saw_done = True
                                    continue
                                try:
                                    chunk = orjson.loads(data)
                                except orjson.JSONDecodeError as exc:
                                    raise UpstreamError(
                                        f"The upstream stream sent a line that is not valid JSON: "
                                        f"{data[:_SNIPPET_CHARS]!r}",
                                        type="invalid_upstream_response",
                                        partial=reassembler.partial(),
                                    ) from exc
                                try:
                                    if chunk.get("error"):
                                        so_far = reassembler.partial()
                                        raise _error_object(chunk, None, partial=so_far)
                                    deltas = reassembler.feed(chunk)
                                except (AttributeError, TypeError) as exc:
                                    raise UpstreamError(
                                        f"The upstream sent a stream chunk that is not a valid "
                                        f"chat.completion.chunk: {data[:_SNIPPET_CHARS]!r}",
                                        type="invalid_upstream_response",
                                        partial=reassembler.partial(),
                                    ) from exc
                                if on_chunk is not None:
                                    await on_chunk(chunk)
                                if on_delta is not None:
                                    for delta in deltas:
                                        await on_delta(delta)
        except TimeoutError as exc:
            if timer is None or not timer.expired():
                raise
            if not (saw_done or reassembler.finish_reason is not None):
                partial = reassembler.partial() if started else None
                if watch is not None and watch.fired:
                    which, limit = "idle", self._idle_timeout
                elif first_event:
                    which, limit = "total", self._total_timeout
                raise _timeout_error(which, limit, partial) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if not (saw_done or reassembler.finish_reason is not None):
                partial = reassembler.partial() if started else None
                raise _from_httpx(
                    exc, started=started, partial=partial, timeout=self._timeout
                ) from exc
        held = reassembler.flush()
        if on_delta is not None:
            for delta in held:
                await on_delta(delta)
        try:
            return reassembler.finish(saw_done)
        except StreamCutError as exc:
            raise UpstreamError(
                "The upstream stream ended before the answer finished (no finish_reason, no [DONE]).",
                type="stream_cut",
                partial=reassembler.partial(),
            ) from exc


class _IdleWatch:
    """Fires ``timer`` when a read of the response body has waited ``idle`` seconds.

    Only a float store per read on the hot path (``waiting_since``, set by the reader); one loop
    timer re-arms itself as needed.
    """

    __slots__ = ("_timer", "_idle", "_loop", "waiting_since", "_handle", "fired")

    def __init__(self, timer: asyncio.Timeout, idle: float) -> None:
        self.fired = False
        self._timer = timer
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        self.waiting_since: float | None = None
        self._handle = self._loop.call_later(idle, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.waiting_since
        if since is not None and now - since >= self._idle:
            self.fired = True
            self._timer.reschedule(now)
            return
        due = (since if since is not None else now) + self._idle
        self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self.waiting_since = None
        self._handle.cancel()


async def _sse_batches(body: AsyncIterator[bytes], watch: _IdleWatch) -> AsyncIterator[list[str]]:
    """The ``data`` of the SSE events in a streamed body, one list per read that completed any.

    httpx-sse's decoders (its line splitter, then its event decoder: ``\r\n``/``\r``/``\n``,
    comments, multi-line data, events without a final blank line dropped) fed straight from
    the body's reads, instead of through ``EventSource.aiter_sse()``'s stack of async
    generators (``aiter_sse`` → lines → ``aiter_text`` → ``aiter_bytes`` → ``aiter_raw``), which
    cost a generator hop per layer per line. Every read is timed by ``watch``.
    """
    text = codecs.getincrementaldecoder("utf-8")("replace")  # SSE is UTF-8 by definition
    lines = SSELineDecoder()
    events = SSEDecoder()
    iterator = body.__aiter__()
    now = watch._loop.time
    try:
        while True:
            watch.waiting_since = now()
            try:
                piece = await iterator.__anext__()
            except StopAsyncIteration:
                break
            watch.waiting_since = None
            decoded = text.decode(piece)
            if not decoded:
                continue
            batch = []
            for line in lines.decode(decoded):
                sse = events.decode(line)
                if sse is not None:
                    batch.append(sse.data)
            if batch:
                yield batch
        batch = []
        for line in lines.decode(text.decode(b"", True)) + lines.flush():
            sse = events.decode(line)
            if sse is not None:
                batch.append(sse.data)
        if batch:
            yield batch
    finally:
        watch.stop()


async def _one_batch(chunk: dict[str, Any]) -> AsyncIterator[list[str]]:
    """A non-streamed completion as the one batch of event data a stream of it would give."""
    yield [orjson.dumps(chunk).decode(), "[DONE]"]


def _chunk_of(completion: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed completion as one chunk (tool calls gain their ``index``)."""
    choices = []
    for choice in completion.get("choices") or ():
        delta = dict(choice.get("message") or {})
        if delta.get("tool_calls"):
            delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(delta["tool_calls"])]
        choices.append(
            {"index": choice.get("index", 0), "delta": delta,
             "finish_reason": choice.get("finish_reason")}
        )
    return {**completion, "object": "chat.completion.chunk", "choices": choices}


def _parse_completion(content: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"The upstream answered with a body that is not JSON: "
            f"{content[:_SNIPPET_CHARS].decode(errors='replace')!r}",
            type="invalid_upstream_response",
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamError(
            "The upstream answered with JSON that is not a chat.completion object.",
            type="invalid_upstream_response",
        )
    if data.get("error"):
        raise _error_object(data, None, partial=None)
    return data


def _error_object(
    body: dict[str, Any] | str, status: int | None, *, partial: dict[str, Any] | None,
    retry_after: float | None = None, status_text: str | None = None,
) -> UpstreamError:
    """An UpstreamError from an OpenAI-shaped ``{"error": {...}}`` body (or any other body)."""
    error = body.get("error") if isinstance(body, dict) else None
    code = etype = None
    if isinstance(error, dict):
        detail = error.get("message") or orjson.dumps(error).decode()
        code, etype = error.get("code"), error.get("type")
    elif isinstance(error, str):
        detail = error
    elif isinstance(body, str):
        detail = body[:_SNIPPET_CHARS] or status_text or ""
    else:
        detail = orjson.dumps(body).decode()[:_SNIPPET_CHARS]
    kind = "upstream_error"
    if status == 400 and _too_long(code, etype, detail):
        kind = "context_length_exceeded"
    if status == 429:
        quota = "insufficient_quota" in (code, etype)
        kind = "insufficient_quota" if quota else "rate_limited"
    where = f"The upstream returned HTTP {status}" if status else "The upstream reported an error"
    return UpstreamError(
        f"{where}: {detail}" if detail else where + ".",
        type=kind, status=status, partial=partial, body=body, retry_after=retry_after,
    )


# How OpenAI, vLLM and llama.cpp server say that the prompt does not fit the context window.
_TOO_LONG_CODES = ("context_length_exceeded", "exceed_context_size_error")
_TOO_LONG_TEXT = ("maximum context length", "exceeds the available context size", "context length")


def _too_long(code: Any, etype: Any, detail: str) -> bool:
    if code in _TOO_LONG_CODES or etype in _TOO_LONG_CODES:
        return True
    lowered = detail.lower()
    return any(text in lowered for text in _TOO_LONG_TEXT)


def _status_error(response: httpx.Response) -> UpstreamError:
    """The UpstreamError for a non-2xx response whose body has been read."""
    content = response.content
    body: dict[str, Any] | str
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = content.decode(errors="replace")
    return _error_object(
        body, response.status_code, partial=None, retry_after=_retry_after(response.headers),
        status_text=response.reason_phrase,
    )


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# The names of the timeouts in messages; the gateway's settings are ``upstream_<key>_timeout``.
_TIMEOUT_NAMES = {
    "connect": "connect timeout",
    "pool": "pool timeout",
    "read": "read timeout",
    "first_byte": "first-byte timeout",
    "idle": "idle timeout",
    "total": "total timeout",
}


def _first_limit(first_byte: float | None, total: float | None) -> tuple[str, float | None]:
    """Which limit applies until the first byte, and its seconds (None: no limit)."""
    if first_byte is None or (total is not None and total < first_byte):
        return "total", total
    return "first_byte", first_byte


def _timeout_error(which: str, seconds: float | None, partial: dict[str, Any] | None) -> UpstreamError:
    """An ``upstream_timeout`` error naming the timeout that fired and its value."""
    what = {
        "connect": "The upstream could not be connected to",
        "pool": "No connection to the upstream was free",
        "read": "The upstream sent nothing",
        "first_byte": "The upstream did not start answering",
        "idle": "The upstream stream sent nothing",
        "total": "The upstream did not finish its answer",
    }[which]
    limit = f" ({seconds:g} s)" if seconds is not None else ""
    return UpstreamError(
        f"{what} within the {_TIMEOUT_NAMES[which]}{limit}.",
        type="upstream_timeout", partial=partial,
    )


def _from_httpx(
    exc: Exception, *, started: bool, partial: dict[str, Any] | None,
    timeout: httpx.Timeout | None = None,
) -> UpstreamError:
    """The one translation of an httpx exception into an UpstreamError.

    ``started`` says the response headers had arrived, so a broken connection is a cut stream;
    ``timeout`` (the request's) gives the value a timeout message names.
    """
    detail = str(exc) or type(exc).__name__
    # httpx-aiohttp maps every aiohttp connection error, a refused connection too, to
    # ConnectTimeout; an OSError cause that is not a timeout says what really happened.
    cause = exc.__cause__
    refused = isinstance(cause, OSError) and not isinstance(cause, TimeoutError)
    if isinstance(exc, httpx.TimeoutException) and not refused:
        if isinstance(exc, httpx.ConnectTimeout):
            which, seconds = "connect", timeout.connect if timeout else None
        elif isinstance(exc, httpx.PoolTimeout):
            which, seconds = "pool", timeout.pool if timeout else None
        else:
            which, seconds = "read", timeout.read if timeout else None
        return _timeout_error(which, seconds, partial)
    if isinstance(exc, httpx.DecodingError):
        return UpstreamError(
            f"The upstream's response could not be decoded: {detail}",
            type="invalid_upstream_response", partial=partial,
        )
    if started and isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError)):
        return UpstreamError(
            f"The upstream stream broke off before the answer finished: {detail}",
            type="stream_cut", partial=partial,
        )
    return UpstreamError(
        f"Could not reach the upstream: {detail}",
        type="upstream_connection_error", partial=partial,
    )
