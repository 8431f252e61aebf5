"""A client that disconnects mid-stream: the response goes on and is stored (or, if configured,
is cancelled with its open steps)."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway

# Run on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

TEXT = "".join(f"word{i} " for i in range(60))


def _disconnect_after_first_delta(url: str) -> str:
    with httpx.stream("POST", f"{url}/v1/responses", timeout=30,
                      json={"model": "scripted-model", "input": "x", "stream": True}) as r:
        response_id = None
        for line in r.iter_lines():
            if line.startswith("data: ") and response_id is None and '"response.created"' in line:
                response_id = line.split('"id":"', 1)[1].split('"', 1)[0]
            if line.startswith("event: response.output_text.delta"):
                return response_id
    raise AssertionError("no delta seen")


def _wait_status(url: str, response_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{url}/v1/responses/{response_id}").json()
        if body["status"] not in ("in_progress", "queued"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_disconnected_client_response_still_completes_and_is_stored(tmp_path):
    with running_gateway(tmp_path) as gw:
        gw.model.replies.append(Reply(content=TEXT, chunk_size=7, chunk_delay_s=0.02))
        response_id = _disconnect_after_first_delta(gw.url)
        body = _wait_status(gw.url, response_id)
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == TEXT


def test_cancel_on_disconnect_cancels_the_response_and_its_steps(tmp_path):
    with running_gateway(tmp_path, cancel_on_disconnect=True) as gw:
        gw.model.replies.append(Reply(content=TEXT, chunk_size=7, chunk_delay_s=0.05))
        response_id = _disconnect_after_first_delta(gw.url)
        body = _wait_status(gw.url, response_id)
        steps = httpx.get(f"{gw.url}/v1/responses/{response_id}/steps").json()["data"]
    assert body["status"] == "cancelled"
    assert [s["state"] for s in steps] == ["canceled"]
