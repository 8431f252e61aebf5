"""Retries and fallbacks against scripted upstreams under real uvicorn on loopback.

Waits go through the ``sleep`` hook, which records the seconds asked for and does not really
sleep, so no test waits out a backoff and none asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from executors.reassembly import Delta
from executors.resilience import ResilientUpstream, UpstreamTarget
from executors.upstream import UpstreamError
from gateway.testing.scripted_upstream import (
    SCRIPTED_MODEL_ID,
    Reply,
    create_scripted_upstream,
)
from tests.servers import ScriptedUpstream, serve_app, serve_scripted_upstream

USER = [{"role": "user", "content": "Hello"}]
STREAM = {"model": SCRIPTED_MODEL_ID, "messages": USER, "stream": True,
          "stream_options": {"include_usage": True}}
PLAIN = {"model": SCRIPTED_MODEL_ID, "messages": USER}


@dataclass
class Outcome:
    """What one ``chat_completion`` did: its result or error, and what the hooks saw."""

    completion: dict[str, Any] | None = None
    error: UpstreamError | None = None
    attempts: list[tuple[dict[str, Any] | None, str]] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)

    @property
    def text(self) -> str | None:
        source = self.completion if self.completion is not None else (self.error and self.error.partial)
        return source["choices"][0]["message"]["content"] if source else None


def run(
    targets: list[UpstreamTarget], body: dict[str, Any], *, forward: bool = True, **options: Any
) -> Outcome:
    """One model call on a fresh ResilientUpstream; ``forward`` passes an ``on_delta``."""
    out = Outcome()

    async def sleep(seconds: float) -> None:
        out.sleeps.append(seconds)

    async def on_attempt(error: dict[str, Any] | None, label: str) -> None:
        out.attempts.append((error, label))

    async def on_delta(delta: Delta) -> None:
        out.deltas.append(delta)

    async def main() -> None:
        upstream = ResilientUpstream(targets, sleep=sleep, **options)
        try:
            out.completion = await upstream.chat_completion(
                body, on_delta=on_delta if forward else None, on_attempt=on_attempt
            )
        except UpstreamError as exc:
            out.error = exc
        finally:
            await upstream.aclose()

    asyncio.run(main())
    return out


def target(upstream: ScriptedUpstream, **kwargs: Any) -> UpstreamTarget:
    return UpstreamTarget(upstream.base_url, "sk-test", **kwargs)


@pytest.fixture
def fallback() -> Iterator[ScriptedUpstream]:
    with serve_scripted_upstream() as upstream:
        yield upstream


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """A base URL on a port that is bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def kinds(out: Outcome) -> list[str | None]:
    return [error and error["type"] for error, _ in out.attempts]


# --- retries on one upstream ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [pytest.param(STREAM, id="stream"), pytest.param(PLAIN, id="plain")])
def test_429_is_retried_after_the_servers_retry_after(
    scripted_upstream: ScriptedUpstream, body: dict[str, Any]
) -> None:
    scripted_upstream.model.replies.extend(
        [Reply(status=429, error_code="rate_limit_exceeded", retry_after=0.05), Reply(content="OK")]
    )
    out = run([target(scripted_upstream, label="primary")], body)
    assert out.text == "OK"
    assert out.sleeps == [0.05]
    (error, label), success = out.attempts
    assert (error["type"], error["status"], label) == ("rate_limited", 429, "primary")
    assert "Rate limit reached" in error["message"]
    assert success == (None, "primary")
    assert len(scripted_upstream.model.requests) == 2


def test_insufficient_quota_is_neither_retried_nor_sent_to_a_fallback(
    scripted_upstream: ScriptedUpstream, fallback: ScriptedUpstream
) -> None:
    scripted_upstream.model.replies.append(Reply(status=429, error_code="insufficient_quota"))
    out = run([target(scripted_upstream), target(fallback)], STREAM)
    assert out.error is not None
    assert (out.error.type, out.error.status) == ("insufficient_quota", 429)
    assert kinds(out) == ["insufficient_quota"]
    assert (len(scripted_upstream.model.requests), len(fallback.model.requests)) == (1, 0)
    assert out.sleeps == []


def test_server_errors_are_retried_with_backoff(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.extend([Reply(status=500), Reply(status=500), Reply(content="OK")])
    out = run([target(scripted_upstream)], STREAM)
    assert out.text == "OK"
    assert kinds(out) == ["upstream_error", "upstream_error", None]
    assert [e and e["status"] for e, _ in out.attempts] == [500, 500, None]
    assert [label for _, label in out.attempts] == [scripted_upstream.base_url] * 3
    # Exponential backoff with jitter: 0.25-0.5 s, then 0.5-0.75 s.
    assert 0.25 <= out.sleeps[0] <= 0.5 <= out.sleeps[1] <= 0.75


def test_backoff_is_capped_by_the_retry_budget(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.extend([Reply(status=503)] * 10)
    out = run([target(scripted_upstream)], STREAM, max_retries=5, retry_max_s=0.3)
    assert out.error is not None and out.error.status == 503
    assert sum(out.sleeps) <= 0.3
    assert len(scripted_upstream.model.requests) == len(out.sleeps) + 1


def test_a_bad_request_is_not_retried(
    scripted_upstream: ScriptedUpstream, fallback: ScriptedUpstream
) -> None:
    scripted_upstream.model.replies.append(Reply(status=400))
    out = run([target(scripted_upstream), target(fallback)], STREAM)
    assert out.error is not None and (out.error.type, out.error.status) == ("upstream_error", 400)
    assert (len(scripted_upstream.model.requests), len(fallback.model.requests)) == (1, 0)


def test_a_stream_cut_before_anything_was_passed_on_is_retried(
    scripted_upstream: ScriptedUpstream,
) -> None:
    # Only the role chunk goes out before the drop: no delta reached the caller.
    scripted_upstream.model.replies.extend(
        [Reply(content="never seen", drop_after_chunks=1), Reply(content="OK")]
    )
    out = run([target(scripted_upstream)], STREAM)
    assert out.text == "OK"
    assert kinds(out) == ["stream_cut", None]
    assert [d.text for d in out.deltas] == ["OK"]


# --- failures after the answer started -----------------------------------------------------------


def test_a_stream_cut_after_deltas_is_not_retried_and_keeps_the_partial(
    scripted_upstream: ScriptedUpstream, fallback: ScriptedUpstream
) -> None:
    # Chunks: role, "The ", "answ", "er i", "s 42" — the connection closes after "answ".
    scripted_upstream.model.replies.append(
        Reply(content="The answer is 42", chunk_size=4, drop_after_chunks=3)
    )
    out = run([target(scripted_upstream), target(fallback)], STREAM)
    assert out.error is not None and out.error.type == "stream_cut"
    assert "broke off" in out.error.message
    assert out.text == "The answ"
    assert [d.text for d in out.deltas] == ["The ", "answ"]
    assert kinds(out) == ["stream_cut"]
    assert (len(scripted_upstream.model.requests), len(fallback.model.requests)) == (1, 0)


def test_invalid_json_mid_stream_is_not_retried(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.append(Reply(content="abcdef", chunk_size=2, garbage_after_chunks=2))
    out = run([target(scripted_upstream)], STREAM)
    assert out.error is not None and out.error.type == "invalid_upstream_response"
    assert "not valid JSON" in out.error.message
    assert out.text == "ab"
    assert len(scripted_upstream.model.requests) == 1


# --- timeouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [pytest.param(STREAM, id="stream"), pytest.param(PLAIN, id="plain")])
def test_first_byte_timeout_is_retried_then_fails(
    scripted_upstream: ScriptedUpstream, body: dict[str, Any]
) -> None:
    scripted_upstream.model.replies.extend([Reply(content="late", delay_s=0.4)] * 2)
    out = run([target(scripted_upstream)], body, max_retries=1, first_byte_timeout=0.1)
    assert out.error is not None and out.error.type == "upstream_timeout"
    assert "first-byte timeout (0.1 s)" in out.error.message
    assert kinds(out) == ["upstream_timeout", "upstream_timeout"]
    assert len(scripted_upstream.model.requests) == 2


def test_total_timeout_across_the_stream(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.append(Reply(content="abcdefghij", chunk_size=1, chunk_delay_s=0.05))
    out = run([target(scripted_upstream)], STREAM, total_timeout=0.2, idle_timeout=5.0)
    assert out.error is not None and out.error.type == "upstream_timeout"
    assert "total timeout (0.2 s)" in out.error.message
    # Text had been passed on: not retried, and what arrived is kept.
    assert len(scripted_upstream.model.requests) == 1
    assert out.text and "abcdefghij".startswith(out.text) and out.text != "abcdefghij"


def test_idle_timeout_names_itself(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.append(Reply(content="abcdef", chunk_size=2, stall_after_chunks=3))
    out = run([target(scripted_upstream)], STREAM, idle_timeout=0.2)
    assert out.error is not None and out.error.type == "upstream_timeout"
    assert "idle timeout (0.2 s)" in out.error.message
    assert out.text == "abcd"


# --- fallbacks ----------------------------------------------------------------------------------


def test_a_fallback_answers_when_the_primary_stays_overloaded(
    scripted_upstream: ScriptedUpstream, fallback: ScriptedUpstream
) -> None:
    scripted_upstream.model.replies.extend([Reply(status=500)] * 3)
    fallback.model.replies.append(Reply(content="from the fallback"))
    targets = [target(scripted_upstream, label="primary"),
               target(fallback, model="fallback-model", label="backup")]
    out = run(targets, STREAM, max_retries=2)
    assert out.text == "from the fallback"
    assert out.attempts[-1] == (None, "backup")
    assert [label for _, label in out.attempts] == ["primary"] * 3 + ["backup"]
    assert len(scripted_upstream.model.requests) == 3
    assert [r["model"] for r in scripted_upstream.model.requests] == [SCRIPTED_MODEL_ID] * 3
    assert fallback.model.requests[0]["model"] == "fallback-model"
    assert fallback.model.requests[0]["messages"] == USER


def test_a_fallback_answers_when_the_primary_refuses_connections(fallback: ScriptedUpstream) -> None:
    fallback.model.replies.append(Reply(content="OK"))
    with refusing_url() as down:
        out = run([UpstreamTarget(down), target(fallback, label="backup")], STREAM, max_retries=1)
    assert out.text == "OK"
    assert kinds(out) == ["upstream_connection_error", "upstream_connection_error", None]
    assert out.attempts[0][1] == down
    assert out.attempts[-1] == (None, "backup")


def test_a_retry_after_longer_than_the_budget_moves_on_at_once(
    scripted_upstream: ScriptedUpstream, fallback: ScriptedUpstream
) -> None:
    scripted_upstream.model.replies.append(Reply(status=429, retry_after=30))
    out = run([target(scripted_upstream), target(fallback, label="backup")], STREAM, retry_max_s=1)
    assert out.text == "Echo: Hello"
    assert out.sleeps == []
    assert kinds(out) == ["rate_limited", None]


def test_when_every_target_fails_the_last_error_is_raised(
    scripted_upstream: ScriptedUpstream, fallback: ScriptedUpstream
) -> None:
    scripted_upstream.model.replies.append(Reply(status=500))
    fallback.model.replies.append(Reply(status=502))
    out = run([target(scripted_upstream), target(fallback)], STREAM, max_retries=0)
    assert out.error is not None and out.error.status == 502
    assert kinds(out) == ["upstream_error", "upstream_error"]


def test_get_falls_back_when_the_primary_is_down(fallback: ScriptedUpstream) -> None:
    async def main(down: str) -> httpx.Response:
        upstream = ResilientUpstream([UpstreamTarget(down), target(fallback)])
        try:
            return await upstream.get("models")
        finally:
            await upstream.aclose()

    with refusing_url() as down:
        response = asyncio.run(main(down))
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [SCRIPTED_MODEL_ID]


# --- keys ---------------------------------------------------------------------------------------


def test_with_api_key_sends_the_clients_key_over_the_shared_client() -> None:
    seen: list[bytes | None] = []
    scripted = create_scripted_upstream()

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]).get(b"authorization"))
        await scripted(scope, receive, send)

    async def main(base_url: str) -> None:
        upstream = ResilientUpstream([UpstreamTarget(base_url, "sk-gateway")])
        view = upstream.with_api_key("sk-client")
        await view.chat_completion(PLAIN)
        await view.aclose()  # the view does not own the client
        await upstream.chat_completion(PLAIN)
        await upstream.with_api_key(None).chat_completion(PLAIN)
        await upstream.aclose()

    with serve_app(recording) as url:
        asyncio.run(main(url + "/v1"))
    assert seen == [b"Bearer sk-client", b"Bearer sk-gateway", None]


def test_no_targets_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ResilientUpstream([])
