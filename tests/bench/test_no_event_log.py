"""The bench's measurement switch (bench.no_event_log): the same gateway, streamed events not stored."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import httpx
from bench.processes import start_gateway, start_upstream


def _stream(url: str) -> bytes:
    reply = httpx.post(
        url + "/v1/responses", json={"model": "scripted-model", "input": "hello", "stream": True}, timeout=60
    )
    assert reply.status_code == 200
    return reply.content


def test_a_gateway_without_the_event_log_streams_the_same_events_and_stores_none(tmp_path: Path) -> None:
    with start_upstream(tmp_path) as upstream:
        bodies = {}
        for event_log in (True, False):
            name = f"gateway-{event_log}"
            with start_gateway(upstream.url + "/v1", tmp_path, name=name, event_log=event_log) as gateway:
                bodies[event_log] = _stream(gateway.url)
            with contextlib.closing(sqlite3.connect(tmp_path / f"{name}.db")) as db:
                # Events stored: the sum over the log's rows (one row per write).
                stored = db.execute(
                    "SELECT coalesce(sum(last_sequence_number - first_sequence_number + 1), 0)"
                    " FROM event_batches"
                ).fetchone()[0]
                statuses = [r[0] for r in db.execute("SELECT status FROM responses")]
            assert statuses == ["completed"]
            types = [line for line in bodies[event_log].split(b"\n") if line.startswith(b"event: ")]
            assert types[-1] == b"event: response.completed"
            assert bodies[event_log].endswith(b"data: [DONE]\n\n")
            assert stored == (len(types) if event_log else 0)
        kinds = [[line for line in body.split(b"\n") if line.startswith(b"event: ")] for body in bodies.values()]
        assert kinds[0] == kinds[1]
