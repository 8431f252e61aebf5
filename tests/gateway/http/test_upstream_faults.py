"""Upstream faults end to end: the real openai SDK against a running gateway whose scripted
upstream misbehaves in each fault mode (issue 5, "Upstream faults")."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai
import pytest

from gateway.testing.scripted_upstream import Reply, ScriptedModel
from tests.gateway.harness import Running, gateway_on, running_gateway
from tests.servers import serve_scripted_upstream

# SDK round trips, streaming, tools and resilience on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
# Small, so that retries and budgets are quick; waits between retries are real (and short).
FAST = {"upstream_max_retries": 2, "upstream_retry_max_s": 2.0}


def steps_of(url: str, response_id: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{url}/v1/responses/{response_id}/steps", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def model_call(url: str, response_id: str) -> dict[str, Any]:
    (step,) = [s for s in steps_of(url, response_id) if s["kind"] == "model_call"]
    return step


def errors_of(step: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed attempts recorded on a step (a successful attempt may be recorded as null)."""
    return [a for a in step["attempts"] if a]


def stream_events(gw: Running, **kwargs: Any) -> list[Any]:
    return list(gw.client().responses.create(model=MODEL, input="x", stream=True, **kwargs))


@pytest.fixture
def gw(tmp_path):
    with running_gateway(tmp_path, ScriptedModel(), **FAST) as running:
        yield running


def test_429_with_retry_after_then_ok_completes(gw):
    gw.model.replies.extend(
        [Reply(status=429, error_code="rate_limit_exceeded", retry_after=0.05), Reply(content="OK")]
    )
    response = gw.client().responses.create(model=MODEL, input="x")
    assert (response.status, response.output_text) == ("completed", "OK")
    assert len(gw.model.requests) == 2
    step = model_call(gw.url, response.id)
    assert step["state"] == "completed"
    (error,) = errors_of(step)
    assert (error["type"], error["status"]) == ("rate_limited", 429)
    assert step["upstream"] == "primary"  # tenants see names; the admin key sees URLs


def test_insufficient_quota_is_a_quota_error_and_not_retried(gw):
    gw.model.replies.append(Reply(status=429, error_code="insufficient_quota"))
    with pytest.raises(openai.RateLimitError) as info:
        gw.client().responses.create(model=MODEL, input="x")
    assert info.value.status_code == 429
    assert info.value.code == "insufficient_quota"
    assert "quota" in info.value.message
    assert len(gw.model.requests) == 1


def test_500_then_ok_completes_and_the_attempt_is_on_the_step(gw):
    gw.model.replies.extend([Reply(status=500), Reply(content="recovered", chunk_size=3)])
    events = stream_events(gw)
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "recovered"
    step = model_call(gw.url, events[-1].response.id)
    (error,) = errors_of(step)
    assert (error["type"], error["status"]) == ("upstream_error", 500)
    assert "HTTP 500" in error["message"]


def test_a_server_that_stays_down_fails_after_the_retries(gw):
    gw.model.replies.extend([Reply(status=503)] * 3)
    with pytest.raises(openai.APIStatusError) as info:
        gw.client().responses.create(model=MODEL, input="x")
    assert info.value.status_code == 502
    assert len(gw.model.requests) == 3  # the first try and upstream_max_retries=2 retries


def failed_stream(gw: Running, reply: Reply) -> tuple[Any, dict[str, Any]]:
    """Stream a response whose upstream ``reply`` fails mid-way; (response.failed event, step)."""
    gw.model.replies.append(reply)
    events = stream_events(gw)
    failed = events[-1]
    assert failed.type == "response.failed"
    assert any(e.type == "response.output_text.delta" for e in events)
    assert len(gw.model.requests) == 1  # text had reached the client: not retried
    step = model_call(gw.url, failed.response.id)
    assert step["state"] == "failed"
    return failed, step


def partial_text(step: dict[str, Any]) -> str:
    return step["response_payload"]["choices"][0]["message"]["content"]


def test_mid_stream_drop_fails_the_response_and_keeps_the_partial_text(gw):
    # Chunks: role, "The ", "answ", "er i", "s 42" — the connection closes after "answ".
    failed, step = failed_stream(
        gw, Reply(content="The answer is 42", chunk_size=4, drop_after_chunks=3)
    )
    assert "broke off" in failed.response.error.message
    assert step["error"]["type"] == "stream_cut"
    assert partial_text(step) == "The answ"


def test_garbage_line_fails_the_response_with_an_invalid_json_message(gw):
    failed, step = failed_stream(gw, Reply(content="abcdef", chunk_size=2, garbage_after_chunks=2))
    assert "not valid JSON" in failed.response.error.message
    assert step["error"]["type"] == "invalid_upstream_response"
    assert partial_text(step) == "ab"


def test_stalled_stream_fails_after_the_idle_timeout(tmp_path):
    with running_gateway(tmp_path, upstream_idle_timeout=0.3, **FAST) as gw:
        failed, step = failed_stream(
            gw, Reply(content="abcdef", chunk_size=2, stall_after_chunks=3)
        )
    assert "idle timeout (0.3 s)" in failed.response.error.message
    assert step["error"]["type"] == "upstream_timeout"
    assert partial_text(step) == "abcd"


def test_a_fallback_answers_when_the_primary_is_down(tmp_path):
    with socket.socket() as sock, serve_scripted_upstream() as fallback:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        down = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        fallbacks = ({"base_url": fallback.base_url, "model": "fallback-model"},)
        fallback.model.replies.append(Reply(content="from the fallback"))
        with gateway_on(tmp_path / "gw.db", down, upstream_fallbacks=fallbacks,
                        upstream_max_retries=1, upstream_retry_max_s=2.0) as (url, _settings):
            with openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0) as client:
                response = client.responses.create(model=MODEL, input="x")
                step = model_call(url, response.id)
    assert response.output_text == "from the fallback"
    assert step["upstream"] == "fallback-1"  # its URL is for the admin key only
    assert [e["type"] for e in errors_of(step)] == ["upstream_connection_error"] * 2
    assert fallback.model.requests[0]["model"] == "fallback-model"
