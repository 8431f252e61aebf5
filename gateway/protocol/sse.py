"""The SSE encoder: one Responses streaming event as the bytes of one flush.

``event: <type>\\ndata: <JSON on one line>\\n\\n`` with ``\\n`` line endings (the framing
the OpenAI SDK's SSE decoder reads; ``shared/DESIGN.md``, Streaming); :data:`DONE` ends a stream.
Pure and byte-exact: the durable event log stores exactly these bytes.

:func:`encode_event` takes the event as one dict. :func:`encode_fields` gives the same bytes
from the type, the sequence number and the other fields, with one ``orjson.dumps`` and one
bytes formatting: the frame head up to the sequence number is built once per event type. The
JSON of an event is compact orjson output with ``type`` and ``sequence_number`` first, so a
frame can also be assembled from pieces (:meth:`gateway.protocol.events.ResponseBuilder`'s
text deltas); the tests hold every way to the bytes of :func:`encode_event`.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DONE", "encode_event", "encode_fields", "event_head"]

DONE = b"data: [DONE]\n\n"

_HEADS: dict[str, bytes] = {}


def encode_event(event: dict[str, Any]) -> bytes:
    """``event: <type>\\ndata: <JSON on one line>\\n\\n`` for an event dict with a ``type``."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def event_head(kind: str) -> bytes:
    """``event: <kind>\\ndata: {"type":"<kind>","sequence_number":`` — a frame up to its
    sequence number (cached per event type)."""
    head = _HEADS.get(kind)
    if head is None:
        head = b"event: " + kind.encode() + b'\ndata: {"type":' + orjson.dumps(kind)
        head = _HEADS[kind] = head + b',"sequence_number":'
    return head


def encode_fields(kind: str, sequence: int, fields: dict[str, Any]) -> bytes:
    """The bytes of ``encode_event({"type": kind, "sequence_number": sequence, **fields})``;
    ``fields`` (not empty, without ``type`` / ``sequence_number``) keep their order."""
    if not fields:
        return encode_event({"type": kind, "sequence_number": sequence})
    return b"%b%d,%b\n\n" % (event_head(kind), sequence, orjson.dumps(fields)[1:])
