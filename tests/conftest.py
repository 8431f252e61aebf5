"""Shared fixtures. Server helpers live in ``tests/servers.py`` (``from tests.servers import serve_app``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import ScriptedUpstream, serve_app, serve_scripted_upstream

__all__ = ["serve_app"]


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """A scripted Chat Completions server on 127.0.0.1: ``.base_url`` for clients, ``.model`` to
    queue Replies and read the requests it received."""
    with serve_scripted_upstream() as upstream:
        yield upstream
