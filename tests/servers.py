"""Real servers for tests: any ASGI app under uvicorn on 127.0.0.1, and the scripted upstream.

``serve_app`` is :func:`gateway.testing.serving.serve_app` (a background-thread uvicorn on an ephemeral
port, yielding ``"http://127.0.0.1:PORT"``), re-exported so tests import it from one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.testing.scripted_upstream import ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app

__all__ = ["ScriptedUpstream", "serve_app", "serve_scripted_upstream"]


@dataclass
class ScriptedUpstream:
    """A running scripted upstream: ``url`` is the server, ``base_url`` what clients use (``/v1``)."""

    url: str
    model: ScriptedModel

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def serve_scripted_upstream(model: ScriptedModel | None = None) -> Iterator[ScriptedUpstream]:
    """Run a scripted upstream (a fresh :class:`ScriptedModel` unless given) until the block ends."""
    model = model or ScriptedModel()
    with serve_app(create_scripted_upstream(model)) as url:
        yield ScriptedUpstream(url, model)
