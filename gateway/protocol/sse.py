"""The SSE encoder: one Responses streaming event as the bytes of one flush.

``event: <type>\\ndata: <JSON on one line>\\n\\n`` with ``\\n`` line endings (the framing
the OpenAI SDK's SSE decoder reads; ``shared/DESIGN.md``, Streaming); :data:`DONE` ends a stream.
Pure and byte-exact: the durable event log stores exactly these bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DONE", "encode_event"]

DONE = b"data: [DONE]\n\n"


def encode_event(event: dict[str, Any]) -> bytes:
    """``event: <type>\\ndata: <JSON on one line>\\n\\n`` for an event dict with a ``type``."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
