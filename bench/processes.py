"""Server processes for the benchmark: start on a free loopback port, wait until ready, stop.

Every server (scripted upstream, tools, gateway, floor proxies, peers) runs in its own process
so none shares a GIL with the load generator. Output goes to ``<log_dir>/<name>.log``; a process
that exits or is not ready in time raises :class:`ServerError` with the log's tail.
:func:`rss_kb` and :func:`cpu_seconds` read ``/proc/<pid>`` (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "ServerError",
    "ServerProcess",
    "cpu_seconds",
    "free_port",
    "python_module",
    "raise_fd_limit",
    "rss_kb",
    "start_floor_proxy",
    "start_gateway",
    "start_server",
    "start_tools",
    "start_upstream",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """A server process that failed to start (the message ends with its log's tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit (children inherit it);
    returns the new soft limit. Holding 1,000 streams needs ~2,000 sockets in the gateway."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _http_ok(host: str, port: int, path: str) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")


class ServerProcess:
    """A started server: ``name``, ``port``, ``url`` (``http://127.0.0.1:PORT``), ``pid``."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.name = name
        self.popen = popen
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL to its whole process group (workers
        included) after ``timeout_s`` seconds or once it has exited."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log_dir: Path,
    ready_path: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 60.0,
) -> ServerProcess:
    """Start ``argv`` and wait until ``GET ready_path`` on ``port`` answers 200.

    ``env`` is added to a copy of this process's environment with every ``STEPCHAIN_*``
    variable removed (so the user's settings never leak into a run) and the repository root on
    ``PYTHONPATH``. Raises ServerError if the process exits or is not ready in ``timeout_s``.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STEPCHAIN_")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    full_env.update(env or {})
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd or log_dir),
            start_new_session=True,  # its own process group, ended whole by stop()
        )
    server = ServerProcess(name, popen, port, log)
    deadline = time.monotonic() + timeout_s
    while not _http_ok("127.0.0.1", port, ready_path):
        if not server.alive():
            raise ServerError(
                f"{name} exited with status {popen.returncode} during start-up:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"{name} was not ready within {timeout_s:g} s:\n{server.log_tail()}")
        time.sleep(0.05)
    return server


def python_module(module: str, *args: str) -> list[str]:
    """``[sys.executable, "-m", module, *args]``."""
    return [sys.executable, "-m", module, *args]


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def start_upstream(log_dir: Path, *, latency_ms: float = 0.0) -> ServerProcess:
    """The scripted upstream (:mod:`bench.upstream`); its Chat Completions base is ``url + "/v1"``."""
    port = free_port()
    argv = python_module("bench.upstream", "--port", str(port), "--latency-ms", f"{latency_ms:g}")
    return start_server("upstream", argv, port=port, log_dir=log_dir, ready_path="/ping")


def start_tools(log_dir: Path, *, latency_ms: float) -> ServerProcess:
    """The HTTP tool server (:mod:`bench.toolserver`): ``POST /<name>`` answers after the latency."""
    port = free_port()
    argv = python_module("bench.toolserver", "--port", str(port), "--latency-ms", f"{latency_ms:g}")
    return start_server("tools", argv, port=port, log_dir=log_dir, ready_path="/")


def start_floor_proxy(
    upstream_base_url: str, log_dir: Path, *, mode: str, wrap: Sequence[str] = (), timeout_s: float = 60.0
) -> ServerProcess:
    """A do-nothing ``/v1/responses`` proxy (:mod:`bench.floorproxy`) in ``mode``
    (``starlette-httpx`` or ``asgi-aiohttp``) to the Chat Completions base ``upstream_base_url``;
    its log is ``floor-<mode>.log``. ``wrap`` prefixes the command (e.g. valgrind)."""
    port = free_port()
    argv = python_module(
        "bench.floorproxy", "--port", str(port), "--upstream-base-url", upstream_base_url, "--mode", mode
    )
    return start_server(
        f"floor-{mode}", [*wrap, *argv], port=port, log_dir=log_dir, ready_path="/healthz", timeout_s=timeout_s
    )


def start_gateway(
    upstream_base_url: str,
    log_dir: Path,
    *,
    name: str = "gateway",
    db: Path | str | None = None,
    wrap: Sequence[str] = (),
    timeout_s: float = 60.0,
    event_log: bool = True,
    root: Path | None = None,
    settings: Mapping[str, str] | None = None,
) -> ServerProcess:
    """``python -m gateway.cli serve`` on a free port with a fresh SQLite file in ``log_dir``
    (WAL; default ``synchronous=NORMAL``) or on ``db`` (a path or a ``postgresql://`` URL), one
    worker, uvloop + httptools via uvicorn's auto.
    ``wrap`` prefixes the command (e.g. valgrind). ``event_log=False``: the same through
    :mod:`bench.no_event_log` (the measurement switch: no streamed event is stored). ``root``:
    another checkout whose packages the gateway runs (first on its ``PYTHONPATH``; default
    this one's, :data:`REPO_ROOT`). ``settings``: ``STEPCHAIN_*`` environment variables for
    the gateway (e.g. ``{"STEPCHAIN_STREAM_FLUSH_S": "0.04"}``; :func:`start_server` drops the
    caller's own)."""
    port = free_port()
    db = db or log_dir / f"{name}.db"
    argv = python_module(
        "gateway.cli" if event_log else "bench.no_event_log", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--upstream-base-url", upstream_base_url, "--db", str(db), "--log-level", "warning",
    )  # fmt: skip
    env = dict(settings or {})
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return start_server(
        name, [*wrap, *argv], port=port, log_dir=log_dir, ready_path="/healthz", env=env, timeout_s=timeout_s
    )
