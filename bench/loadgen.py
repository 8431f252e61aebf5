"""The load generator: a raw asyncio HTTP/1.1 keep-alive client, fixed concurrency, fixed count.

Why not httpx: the harness measures its own ceiling against a trivial endpoint and shows both
clients side by side (scenario 0); httpx spends several times more client CPU per request, and
on a 2-core machine every client microsecond is taken from the server under test.

Shapes::

    conn = HTTPConnection("127.0.0.1", 8080)
    reply = await conn.request(b"POST", "/v1/responses", body, marker=b"output_text.delta")
    reply.status, reply.body, reply.t_marker, reply.t_end   # times are perf_counter() seconds

    result = await run_load(one_request, concurrency=16, count=2000, warmup=32)
    result.rps, result.latency_ms()  # {"p50", "p90", "p99", "mean", "max"}

``one_request(worker, index) -> Sample`` does one logical request (it may make several HTTP
calls, e.g. a client running its own tools); each worker owns its connections, so workers never
contend. A raised exception or ``Sample.ok == False`` counts as an error; the first error
message is kept for the report.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HTTPConnection",
    "HTTPError",
    "HTTPReply",
    "LoadResult",
    "Sample",
    "Worker",
    "percentile",
    "run_load",
    "summarize",
]

_MAX_HEAD = 64 * 1024
_STALE_AFTER_S = 1.0


class HTTPError(Exception):
    """A malformed or truncated HTTP/1.1 response, or a closed connection."""


@dataclass(slots=True)
class HTTPReply:
    """One HTTP response: status, lower-cased headers, whole body; perf_counter() timestamps.

    ``t_start`` is just before the request was written, ``t_marker`` when the first body piece
    containing the marker arrived (None without a marker or if it never came), ``t_end`` when the
    last body byte arrived.
    """

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    t_start: float
    t_marker: float | None
    t_end: float


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection (Content-Length and chunked bodies); not shared.

    Reconnects lazily after the server closes it. Raises :class:`HTTPError` or ``OSError``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._host_header = f"{host}:{port}".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._idle_since = 0.0

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, limit=_MAX_HEAD * 16
        )

    def close(self) -> None:
        """Close the socket; it is closed after one more loop turn (a transport callback).

        A request not fully sent is dropped (``abort``): a graceful close would keep the socket
        open until the server read the rest, which it may never do.
        """
        if self._writer is not None:
            transport = self._writer.transport
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
        self._reader = self._writer = None

    async def request(
        self,
        method: bytes,
        path: str,
        body: bytes | None = None,
        *,
        content_type: bytes = b"application/json",
        marker: bytes | None = None,
        on_marker: Callable[[], None] | None = None,
    ) -> HTTPReply:
        """Send one request and read the whole response (see :class:`HTTPReply`).

        ``on_marker`` is called once, as soon as a chunked body shows ``marker`` (the memory
        scenario counts streams the server is holding that way).
        """
        head = [method, b" ", path.encode(), b" HTTP/1.1\r\nHost: ", self._host_header, b"\r\n"]
        if body is not None:
            head += [b"Content-Type: ", content_type, b"\r\nContent-Length: ",
                     str(len(body)).encode(), b"\r\n"]  # fmt: skip
        head.append(b"\r\n")
        if body:
            head.append(body)
        raw = b"".join(head)
        # A kept-alive connection the server closed while idle (keep-alive timeouts are
        # seconds) fails before any byte of the response: retry that once on a new connection.
        # Only after an idle second, so a server dropping live requests is never masked.
        for attempt in (0, 1):
            reused = self._writer is not None
            stale = reused and time.perf_counter() - self._idle_since >= _STALE_AFTER_S
            if not reused:
                await self._connect()
            reader, writer = self._reader, self._writer
            assert reader is not None and writer is not None
            t_start = time.perf_counter()
            try:
                writer.write(raw)
                raw_head = await reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.close()
                partial = getattr(exc, "partial", b"")
                if not stale or partial or attempt:
                    raise HTTPError(f"connection closed before the response head: {exc!r}") from exc
        lines = raw_head[:-4].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.close()
            raise HTTPError(f"bad status line {lines[0][:80]!r}") from None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        t_marker: float | None = None
        try:
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                body_out, t_marker = await self._read_chunked(reader, marker, on_marker)
            elif b"content-length" in headers:
                body_out = await reader.readexactly(int(headers[b"content-length"]))
                if marker is not None and marker in body_out:
                    t_marker = time.perf_counter()
            else:  # body until close
                body_out = await reader.read()
                if marker is not None and marker in body_out:
                    t_marker = time.perf_counter()
                self.close()
        except asyncio.IncompleteReadError as exc:
            self.close()
            raise HTTPError("connection closed mid-body") from exc
        t_end = time.perf_counter()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        self._idle_since = t_end
        return HTTPReply(status, headers, body_out, t_start, t_marker, t_end)

    @staticmethod
    async def _read_chunked(
        reader: asyncio.StreamReader,
        marker: bytes | None,
        on_marker: Callable[[], None] | None,
    ) -> tuple[bytes, float | None]:
        parts: list[bytes] = []
        t_marker: float | None = None
        tail = b""
        keep = len(marker) - 1 if marker else 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise HTTPError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts), t_marker
            data = await reader.readexactly(size + 2)
            piece = data[:-2]
            parts.append(piece)
            if marker is not None and t_marker is None:
                window = tail + piece
                if marker in window:
                    t_marker = time.perf_counter()
                    if on_marker is not None:
                        on_marker()
                elif keep:
                    tail = window[-keep:]


@dataclass(slots=True)
class Sample:
    """One logical request: seconds to the last byte and to the first marker (streams)."""

    latency_s: float
    first_s: float | None = None
    ok: bool = True
    error: str | None = None
    extra: Any = None


class Worker:
    """One closed-loop client: its own connections, by (host, port), reused between requests."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._idle: dict[tuple[str, int], list[HTTPConnection]] = {}

    def connection(self, host: str, port: int) -> HTTPConnection:
        """An idle connection to (host, port), or a new one; give it back with :meth:`release`."""
        idle = self._idle.get((host, port))
        return idle.pop() if idle else HTTPConnection(host, port)

    def release(self, conn: HTTPConnection) -> None:
        self._idle.setdefault((conn.host, conn.port), []).append(conn)

    async def request(
        self, host: str, port: int, method: bytes, path: str, body: bytes | None = None,
        *, marker: bytes | None = None, on_marker: Callable[[], None] | None = None,
    ) -> HTTPReply:  # fmt: skip
        """One request on a pooled connection (a failed connection is dropped, not reused)."""
        conn = self.connection(host, port)
        try:
            reply = await conn.request(method, path, body, marker=marker, on_marker=on_marker)
        except BaseException:
            conn.close()
            raise
        self.release(conn)
        return reply

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def aclose(self) -> None:
        """:meth:`close`, then one loop turn: a transport closes its socket in a callback, which
        would never run if the loop ended right after (a ResourceWarning at garbage collection)."""
        self.close()
        await asyncio.sleep(0)


RequestFn = Callable[[Worker, int], Awaitable[Sample]]


@dataclass
class LoadResult:
    """The measured phase of one run: samples, wall seconds, client CPU seconds, errors."""

    concurrency: int
    samples: list[Sample]
    wall_s: float
    client_cpu_s: float
    errors: int = 0
    first_error: str | None = None
    error_samples: list[Sample] = field(default_factory=list)
    probe_delta: float | None = None

    @property
    def count(self) -> int:
        return len(self.samples) + self.errors

    @property
    def rps(self) -> float:
        return self.count / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        return summarize([s.latency_s * 1000 for s in self.samples])

    def first_ms(self) -> dict[str, float]:
        return summarize([s.first_s * 1000 for s in self.samples if s.first_s is not None])


async def _run_phase(
    workers: Sequence[Worker], request: RequestFn, count: int, start: int, timeout_s: float
) -> tuple[list[Sample], list[Sample]]:
    indices = itertools.count(start)
    end = start + count
    good: list[Sample] = []
    bad: list[Sample] = []

    async def loop(worker: Worker) -> None:
        while True:
            i = next(indices)
            if i >= end:
                return
            try:
                sample = await asyncio.wait_for(request(worker, i), timeout_s)
            except Exception as exc:  # any failure is a counted error, never a crash
                worker.close()
                sample = Sample(0.0, ok=False, error=f"{type(exc).__name__}: {exc}")
            (good if sample.ok else bad).append(sample)

    await asyncio.gather(*(loop(w) for w in workers))
    return good, bad


async def run_load(
    request: RequestFn,
    *,
    concurrency: int,
    count: int,
    warmup: int = 0,
    timeout_s: float = 60.0,
    probe: Callable[[], float] | None = None,
) -> LoadResult:
    """Run ``warmup`` unmeasured then ``count`` measured requests, ``concurrency`` at a time.

    Indices passed to ``request`` run from 0 (warm-up first) to ``warmup + count - 1``. Errors
    in the warm-up are counted too: a scenario that fails there fails. A request taking longer
    than ``timeout_s`` seconds is an error. ``probe`` (e.g. a server's CPU seconds) is read
    just before and after the measured phase; the difference is ``probe_delta``.
    """
    workers = [Worker(i) for i in range(concurrency)]
    try:
        _, warm_bad = await _run_phase(workers, request, warmup, 0, timeout_s)
        probe0 = probe() if probe else 0.0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        good, bad = await _run_phase(workers, request, count, warmup, timeout_s)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        probe_delta = probe() - probe0 if probe else None
    finally:
        for worker in workers:
            worker.close()
        await asyncio.sleep(0)  # let the transports close their sockets (see Worker.aclose)
    bad = warm_bad + bad
    return LoadResult(
        concurrency=concurrency,
        samples=good,
        wall_s=wall,
        client_cpu_s=cpu,
        errors=len(bad),
        first_error=bad[0].error if bad else None,
        error_samples=bad[:5],
        probe_delta=probe_delta,
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ascending values, linearly interpolated between ranks
    (numpy's default method). Raises ValueError on an empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"p50", "p90", "p99", "mean", "max"}`` of the values (all NaN when there are none)."""
    if not values:
        nan = float("nan")
        return {"p50": nan, "p90": nan, "p99": nan, "mean": nan, "max": nan}
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "mean": sum(ordered) / len(ordered),
        "max": ordered[-1],
    }
