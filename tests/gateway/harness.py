"""A running gateway for tests: scripted upstream + gateway, both real uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai

from gateway.config import Settings
from gateway.http.app import create_app
from gateway.testing.scripted_upstream import ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app


#: The database :func:`running_gateway` uses when set: a PostgreSQL URL, set for one test by the
#: ``on_both_backends`` fixture (tests/conftest.py). None: a fresh SQLite file in ``tmp_path``.
database_url: str | None = None


@dataclasses.dataclass
class Running:
    """A gateway under test: its URL, an SDK client, and the scripted model behind it.

    Clients from :meth:`client` and :meth:`http` are closed (their sockets too) when the gateway
    stops, so a test may use them without a ``with``.
    """

    url: str
    model: ScriptedModel
    upstream_url: str
    db: Path | str  # an SQLite file, or a PostgreSQL URL
    settings: Settings
    clients: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, **kwargs)
        self.clients.callback(client.close)
        return client

    def http(self) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=30)
        self.clients.callback(client.close)
        return client


@contextlib.contextmanager
def running_gateway(
    tmp_path: Path, model: ScriptedModel | None = None, *, db: Path | str | None = None, **settings: Any
) -> Iterator[Running]:
    """Start a scripted upstream and a gateway on ``db`` (a module's ``module_db``), else on
    :data:`database_url` when a test runs on PostgreSQL, else on a fresh SQLite file in ``tmp_path``."""
    model = model or ScriptedModel()
    db = db or database_url or tmp_path / "stepchain.db"
    with serve_app(create_scripted_upstream(model)) as upstream_url:
        with gateway_on(db, f"{upstream_url}/v1", **settings) as (url, config):
            running = Running(url, model, upstream_url, db, config)
            with running.clients:
                yield running


def fresh_db(tmp_path: Path) -> Path | str:
    """The database for a test's own :func:`gateway_on`: :data:`database_url` when the test runs
    on PostgreSQL, else a new SQLite file in ``tmp_path``."""
    return database_url or tmp_path / "stepchain.db"


@contextlib.contextmanager
def gateway_on(db: Path | str, upstream_base_url: str, **settings: Any) -> Iterator[tuple[str, Settings]]:
    """Just the gateway, on ``db``, against ``upstream_base_url`` (for restarts)."""
    # Tool servers in tests listen on 127.0.0.1: allow loopback unless a test says otherwise.
    settings.setdefault("tool_allowed_networks", "127.0.0.0/8")
    config = Settings(upstream_base_url=upstream_base_url, db=str(db), **settings)
    with serve_app(create_app(config)) as url:
        yield url, config


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(
    args: Sequence[str], log: Path, *, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real ``stepchain serve`` process (``args`` after ``serve``, a free ``--port`` added),
    its output in ``log``; yields its URL once ``/healthz`` answers; on exit kills its whole
    process group (uvicorn's workers too), also when the test failed."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--log-level",
             "warning", *args],
            env={**os.environ, "STEPCHAIN_TOOL_ALLOWED_NETWORKS": "127.0.0.0/8", **(env or {})},
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,  # its own process group: workers included in the kill below
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        yield url, proc
    finally:
        kill_process_group(proc)


def kill_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL every process in ``proc``'s group (started with ``start_new_session=True``),
    then reap ``proc``. Safe to call when some or all of them have exited already."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
