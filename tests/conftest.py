"""Shared fixtures. Server helpers live in ``tests/servers.py`` (``from tests.servers import serve_app``).

``no_process_left_behind`` (every session): the test run is made a child subreaper, so a process
orphaned by a test (a uvicorn worker whose parent was killed, a daemonised server) becomes a child
of the run instead of init; at the end of the session any child still running fails the run,
after being killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ScriptedUpstream, serve_app, serve_scripted_upstream

__all__ = ["serve_app"]

_PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """A scripted Chat Completions server on 127.0.0.1: ``.base_url`` for clients, ``.model`` to
    queue Replies and read the requests it received."""
    with serve_scripted_upstream() as upstream:
        yield upstream


def child_processes(parent: int) -> dict[int, str]:
    """``{pid: command line}`` of the running (not zombie) children of ``parent``; reaps the
    zombies among them when ``parent`` is this process."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) != parent:
            continue
        if state == "Z":
            if parent == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry.name), os.WNOHANG)
            continue
        children[int(entry.name)] = cmdline.strip()
    return children


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the session when a test left a process running (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    left = child_processes(os.getpid())
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in left:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    assert not left, f"processes left running by the tests (killed now): {left}"
