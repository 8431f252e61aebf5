"""A TCP proxy on loopback between a store and PostgreSQL that can lose a COMMIT's answer.

:class:`CommitCutProxy` forwards every connection byte for byte. Armed with
:meth:`CommitCutProxy.cut_after` and a marker (bytes the client sends in the statement to cut,
e.g. a unique string in a parameter), it forwards that statement to the server, swallows the
server's whole answer up to the ``ReadyForQuery`` message that reports the connection idle
again (status ``I``: outside any transaction, so the statement or its transaction has
committed) and then closes both sides. The client sees its connection break with its write
in flight; the server has committed it. That is the one outcome no database client can rule
out, made deterministic: the cut happens exactly once per arming, always after the commit.

It speaks just enough of the PostgreSQL wire protocol (v3) to find message boundaries in the
server's stream: a startup phase, then ``type byte + int32 length`` messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Iterator

__all__ = ["CommitCutProxy", "proxy_in_thread"]


class CommitCutProxy:
    """``async with CommitCutProxy(host, port) as proxy``: listens on ``proxy.port``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.cuts = 0  # how many statements had their answer cut so far
        self._marker: tuple[bytes, ...] | None = None
        self._then_refuse = False
        self._refuse_after: tuple[bytes, ...] | None = None
        self.refusing = False  # new connections are closed at once (the database "is down")
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> CommitCutProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # each connection's task ends on its own then
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        await self._server.wait_closed()

    def cut_after(self, *markers: bytes, then_refuse: bool = False) -> None:
        """Cut the answer of the next statement whose client bytes contain every one of
        ``markers`` (each as is, or hex-encoded: a ``bytea`` parameter in text format). With
        ``then_refuse`` the database looks down from then on: every new connection is closed at
        once (until :meth:`accept`)."""
        self._marker = markers
        self._then_refuse = then_refuse

    def refuse_after_close(self, *markers: bytes) -> None:
        """Look down (refuse every new connection, until :meth:`accept`) once the connection
        whose client bytes contained every one of ``markers`` has closed: e.g. after a
        process's start-up check closed its store, before its app opens the store again."""
        self._refuse_after = markers

    def accept(self) -> None:
        """Forward new connections again (after ``then_refuse``)."""
        self.refusing = False

    # -- one connection -----------------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        server_w: asyncio.StreamWriter | None = None
        state = {"armed": False, "marked": False}
        try:
            if self.refusing:
                return
            server_r, server_w = await asyncio.open_connection(*self.target)
            self._writers.add(server_w)
            upstream = asyncio.ensure_future(self._client_to_server(client_r, server_w, state))
            try:
                await self._server_to_client(server_r, client_w, state)
            finally:
                upstream.cancel()
                with contextlib.suppress(BaseException):
                    await upstream
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if state["marked"]:
                self.refusing = True
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.transport.abort()
                    self._writers.discard(writer)
            self._tasks.discard(task)

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, bool]
    ) -> None:
        """Forward the client's bytes; arm the cut when one batch of its messages (up to a
        ``Sync``: a statement's Parse, Bind and Execute, or a pipeline's) holds every marker."""
        buffer = batch = b""
        startup = True  # the untyped startup message (after any SSL/GSS request) comes first
        while True:
            data = await reader.read(65536)
            if not data:
                writer.write_eof()
                return
            buffer += data
            while True:
                if startup:
                    if len(buffer) < 8:
                        break
                    (length,) = struct.unpack("!I", buffer[:4])
                    if len(buffer) < length:
                        break
                    code = struct.unpack("!I", buffer[4:8])[0]
                    startup = code in (80877103, 80877104)  # SSL/GSS request: startup follows
                    buffer = buffer[length:]
                    continue
                if len(buffer) < 5:
                    break
                (length,) = struct.unpack("!I", buffer[1:5])
                if len(buffer) < length + 1:
                    break
                message, buffer = buffer[: length + 1], buffer[length + 1 :]
                batch += message
                markers = self._marker
                if markers is not None and all(m in batch or m.hex().encode() in batch for m in markers):
                    self._marker = None  # once per arming
                    state["armed"] = True
                after = self._refuse_after
                if after is not None and all(m in batch for m in after):
                    self._refuse_after = None
                    state["marked"] = True
                if message[:1] == b"S":
                    batch = b""
            writer.write(data)
            await writer.drain()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, bool]
    ) -> None:
        """Forward the server's messages; once armed, drop the answer that reports the write
        committed (from a ``COMMIT``'s CommandComplete, or a lone statement's answer, up to
        the ``ReadyForQuery`` that says idle) and return, which closes both sides. Answers
        inside an explicit transaction (pipeline mode reads them before sending ``COMMIT``)
        are forwarded."""
        in_transaction = swallowing = False
        held: list[bytes] = []
        first = True
        while True:
            kind = await reader.readexactly(1)
            if first and kind in (b"N", b"S"):  # the one-byte answer to an SSL/GSS request
                writer.write(kind)
                continue
            first = False
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            message = kind + struct.pack("!I", length) + body
            tag = body.split(b"\0", 1)[0] if kind == b"C" else b""
            if kind == b"C" and tag in (b"COMMIT", b"ROLLBACK"):
                in_transaction = False
                if state["armed"] and tag == b"COMMIT":
                    swallowing = True
            elif kind == b"C" and tag == b"BEGIN":
                in_transaction = True
            if state["armed"]:
                if kind == b"Z" and body == b"I":
                    self.cuts += 1
                    self.refusing = self.refusing or self._then_refuse
                    return  # the caller closes both sides: the answer never arrives
                if swallowing:
                    continue
                if not in_transaction and kind != b"Z":
                    held.append(message)  # a lone statement's answer: held until its end
                    continue
                message, held = b"".join(held) + message, []
            if kind == b"Z":
                in_transaction = body != b"I"
            writer.write(message)
            if kind == b"Z" or in_transaction:
                await writer.drain()


@contextlib.contextmanager
def proxy_in_thread(host: str, port: int) -> Iterator[CommitCutProxy]:
    """A :class:`CommitCutProxy` on an event loop of its own thread (for servers in other
    processes); stopped, with its connections, when the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="commit-cut-proxy", daemon=True)
    thread.start()
    proxy = CommitCutProxy(host, port)
    try:
        asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(30)
        yield proxy
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(proxy.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
