"""The upstream client against the scripted upstream under real uvicorn (and a few MockTransport
bodies that a well-behaved server cannot send)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import orjson
import pytest

from executors.reassembly import Delta
from executors.upstream import UpstreamClient, UpstreamError, _from_httpx
from gateway.testing.scripted_upstream import SCRIPTED_MODEL_ID, Reply
from tests.servers import ScriptedUpstream

USER = [{"role": "user", "content": "Hello"}]
STREAM = {"model": SCRIPTED_MODEL_ID, "messages": USER, "stream": True,
          "stream_options": {"include_usage": True}}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def call(
    base_url: str,
    body: dict[str, Any],
    *,
    client: httpx.AsyncClient | None = None,
    **options: Any,
) -> tuple[dict[str, Any], list[Delta], list[dict[str, Any]]]:
    """One ``chat_completion`` on a fresh UpstreamClient; returns (completion, deltas, raw chunks)."""
    deltas: list[Delta] = []
    chunks: list[dict[str, Any]] = []

    async def on_delta(delta: Delta) -> None:
        deltas.append(delta)

    async def on_chunk(chunk: dict[str, Any]) -> None:
        chunks.append(chunk)

    async def main() -> dict[str, Any]:
        upstream = UpstreamClient(base_url, "sk-test", client=client, **options)
        try:
            return await upstream.chat_completion(body, on_delta=on_delta, on_chunk=on_chunk)
        finally:
            await upstream.aclose()

    return asyncio.run(main()), deltas, chunks


def failure(base_url: str, body: dict[str, Any], **options: Any) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        call(base_url, body, **options)
    return info.value


def message_of(completion: dict[str, Any]) -> dict[str, Any]:
    return completion["choices"][0]["message"]


# --- against the scripted upstream ---------------------------------------------------------------


def test_non_streaming(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.append(Reply(content="Hello there!"))
    body = {"model": SCRIPTED_MODEL_ID, "messages": USER}
    completion, deltas, chunks = call(scripted_upstream.base_url, body)
    assert completion["object"] == "chat.completion"
    assert message_of(completion)["content"] == "Hello there!"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["total_tokens"] > 0
    assert (deltas, chunks) == ([], [])
    assert scripted_upstream.model.requests == [body]


def test_streaming_deltas_arrive_in_order_while_the_stream_runs(
    scripted_upstream: ScriptedUpstream,
) -> None:
    scripted_upstream.model.replies.append(
        Reply(content="abcdefgh", reasoning="hmm", chunk_size=2, chunk_delay_s=0.02)
    )
    stamps: list[float] = []
    deltas: list[Delta] = []

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        upstream = UpstreamClient(scripted_upstream.base_url)

        async def on_delta(delta: Delta) -> None:
            deltas.append(delta)
            stamps.append(loop.time())

        try:
            completion = await upstream.chat_completion(STREAM, on_delta=on_delta)
        finally:
            await upstream.aclose()
        stamps.append(loop.time())
        return completion

    completion = asyncio.run(main())
    assert [(d.kind, d.text) for d in deltas] == [
        ("reasoning", "hm"), ("reasoning", "m"),
        ("content", "ab"), ("content", "cd"), ("content", "ef"), ("content", "gh"),
    ]
    # The first delta was handed over before the server had sent the later ones.
    assert stamps[0] < stamps[-2] <= stamps[-1]
    message = message_of(completion)
    assert (message["content"], message["reasoning_content"]) == ("abcdefgh", "hmm")
    assert completion["usage"]["completion_tokens"] > 0
    assert scripted_upstream.model.requests[-1]["stream_options"] == {"include_usage": True}


def test_streaming_tool_call_from_the_default_script(scripted_upstream: ScriptedUpstream) -> None:
    body = {**STREAM, "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
            "tools": [WEATHER_TOOL]}
    completion, deltas, chunks = call(scripted_upstream.base_url, body)
    (tool_call,) = message_of(completion)["tool_calls"]
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert (deltas[0].call_id, deltas[0].name) == (tool_call["id"], "get_weather")
    assert "".join(d.text for d in deltas) == '{"city":"Oslo"}'
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion["usage"]


def test_default_script_summarises_tool_results_and_echoes(scripted_upstream: ScriptedUpstream) -> None:
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5 degrees"},
    ]
    body = {"model": SCRIPTED_MODEL_ID, "messages": messages, "tools": [WEATHER_TOOL]}
    completion, _, _ = call(scripted_upstream.base_url, body)
    assert message_of(completion)["content"] == "Tool results: 5 degrees"
    body = {"model": SCRIPTED_MODEL_ID, "messages": [{"role": "user", "content": "Hi there"}],
            "tools": [WEATHER_TOOL]}
    completion, _, _ = call(scripted_upstream.base_url, body)
    assert message_of(completion)["content"] == "Echo: Hi there"


def test_models(scripted_upstream: ScriptedUpstream) -> None:
    async def main() -> httpx.Response:
        upstream = UpstreamClient(scripted_upstream.base_url)
        try:
            return await upstream.get("models")
        finally:
            await upstream.aclose()

    response = asyncio.run(main())
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [SCRIPTED_MODEL_ID]


@pytest.mark.parametrize("stream", [pytest.param(False, id="plain"), pytest.param(True, id="stream")])
def test_server_error(scripted_upstream: ScriptedUpstream, stream: bool) -> None:
    scripted_upstream.model.replies.append(Reply(status=500))
    error = failure(scripted_upstream.base_url, {**STREAM, "stream": stream})
    assert (error.type, error.status) == ("upstream_error", 500)
    assert isinstance(error.body, dict) and error.body["error"]["type"] == "server_error"
    assert "HTTP 500" in str(error)


@pytest.mark.parametrize(
    ("code", "kind"),
    [pytest.param("insufficient_quota", "insufficient_quota", id="quota"),
     pytest.param("rate_limit_exceeded", "rate_limited", id="rate-limit")],
)
def test_429(scripted_upstream: ScriptedUpstream, code: str, kind: str) -> None:
    scripted_upstream.model.replies.append(Reply(status=429, error_code=code, retry_after=7))
    error = failure(scripted_upstream.base_url, STREAM)
    assert (error.type, error.status, error.retry_after) == (kind, 429, 7.0)


def test_dropped_stream_is_a_stream_cut_keeping_the_partial_text(
    scripted_upstream: ScriptedUpstream,
) -> None:
    # Chunks: role, "The ", "answ", "er i", "s 42" — the connection closes after "answ".
    scripted_upstream.model.replies.append(
        Reply(content="The answer is 42", chunk_size=4, drop_after_chunks=3)
    )
    error = failure(scripted_upstream.base_url, STREAM)
    assert error.type == "stream_cut"
    assert error.partial is not None and message_of(error.partial)["content"] == "The answ"


def test_garbage_chunk_is_an_invalid_upstream_response(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.append(Reply(content="abcdef", chunk_size=2, garbage_after_chunks=2))
    error = failure(scripted_upstream.base_url, STREAM)
    assert error.type == "invalid_upstream_response"
    assert error.partial is not None and message_of(error.partial)["content"] == "ab"


def test_stalled_stream_times_out_after_the_idle_timeout(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.model.replies.append(Reply(content="abcdef", chunk_size=2, stall_after_chunks=3))
    deltas: list[Delta] = []

    async def on_delta(delta: Delta) -> None:
        deltas.append(delta)

    async def main() -> None:
        upstream = UpstreamClient(scripted_upstream.base_url, idle_timeout=0.3)
        try:
            await upstream.chat_completion(STREAM, on_delta=on_delta)
        finally:
            await upstream.aclose()

    with pytest.raises(UpstreamError) as info:
        asyncio.run(main())
    assert info.value.type == "upstream_timeout"
    # The server still held "ef": these two were delivered while the stream was open.
    assert [d.text for d in deltas] == ["ab", "cd"]
    assert info.value.partial is not None and message_of(info.value.partial)["content"] == "abcd"


def test_connection_refused() -> None:
    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for body in ({**STREAM, "stream": False}, STREAM):
            error = failure(f"http://127.0.0.1:{port}/v1", body)
            assert (error.type, error.status, error.partial) == ("upstream_connection_error", None, None)


def test_a_given_client_is_shared_not_closed(scripted_upstream: ScriptedUpstream) -> None:
    async def main() -> bool:
        async with httpx.AsyncClient() as client:
            upstream = UpstreamClient(scripted_upstream.base_url, client=client)
            await upstream.chat_completion({"model": "m", "messages": USER})
            await upstream.aclose()
            return client.is_closed

    assert asyncio.run(main()) is False


# --- bodies a scripted server does not send (MockTransport) --------------------------------------


class Body(httpx.AsyncByteStream):
    """A response body in these reads, optionally ending with a transport error."""

    def __init__(self, pieces: list[bytes], error: Exception | None = None) -> None:
        self.pieces, self.error = pieces, error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.error is not None:
            raise self.error


def mock(
    status: int = 200, pieces: Sequence[bytes] = (), *, error: Exception | None = None,
    headers: dict[str, str] | None = None, seen: list[httpx.Request] | None = None,
) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, headers=headers or {"content-type": "text/event-stream"},
                              stream=Body(list(pieces), error))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else orjson.dumps(c)) + b"\n\n" for c in chunks
    )


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
HI = {**HEAD, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
STOP = {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
BASE = "http://127.0.0.1:9/v1"


def mocked(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        try:
            return await UpstreamClient(BASE, "sk-test", client=client).chat_completion(body)
        finally:
            await client.aclose()

    return asyncio.run(main())


def mocked_failure(client: httpx.AsyncClient, body: dict[str, Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        mocked(client, body)
    return info.value


def test_request_shape() -> None:
    seen: list[httpx.Request] = []
    mocked(mock(pieces=[sse(HI, STOP, "[DONE]")], seen=seen), STREAM)
    (request,) = seen
    assert str(request.url) == BASE + "/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["accept"] == "text/event-stream"
    assert orjson.loads(request.content) == STREAM


def test_error_chunk_mid_stream() -> None:
    oops = {"error": {"message": "model crashed", "type": "server_error", "code": None}}
    error = mocked_failure(mock(pieces=[sse(HI, oops)]), STREAM)
    assert error.type == "upstream_error" and "model crashed" in str(error)
    assert error.partial is not None and message_of(error.partial)["content"] == "Hi"


@pytest.mark.parametrize(
    "data",
    [pytest.param("[1, 2]", id="not-an-object"), pytest.param('{"choices": 3}', id="bad-choices")],
)
def test_chunk_of_the_wrong_shape(data: str) -> None:
    assert mocked_failure(mock(pieces=[sse(HI, data)]), STREAM).type == "invalid_upstream_response"


def test_non_json_body_of_a_plain_call() -> None:
    client = mock(pieces=[b"<html>oops</html>"], headers={"content-type": "text/html"})
    assert mocked_failure(client, {"model": "m", "messages": USER}).type == "invalid_upstream_response"


def test_json_answer_to_a_streaming_request_is_taken_as_the_completion() -> None:
    completion = {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "refusal": None,
            "tool_calls": [{"id": "call_a", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    client = mock(pieces=[orjson.dumps(completion)], headers={"content-type": "application/json"})
    assert mocked(client, STREAM) == completion


@pytest.mark.parametrize(
    "pieces",
    [pytest.param([sse(HI, STOP, "[DONE]")], id="after-done"),
     pytest.param([sse(HI, STOP)], id="after-finish-reason")],
)
def test_a_break_after_the_answer_finished_is_harmless(pieces: list[bytes]) -> None:
    client = mock(pieces=pieces, error=httpx.RemoteProtocolError("peer closed connection"))
    assert message_of(mocked(client, STREAM))["content"] == "Hi"


def test_a_break_before_the_answer_finished_is_a_stream_cut() -> None:
    client = mock(pieces=[sse(HI)], error=httpx.ReadError("connection reset"))
    error = mocked_failure(client, STREAM)
    assert error.type == "stream_cut" and message_of(error.partial or {})["content"] == "Hi"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [pytest.param({"retry-after-ms": "1500"}, 1.5, id="ms"),
     pytest.param({"retry-after": "3"}, 3.0, id="seconds"),
     pytest.param({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, id="past-date"),
     pytest.param({"retry-after": "soon"}, None, id="unparseable")],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    client = mock(429, [b'{"error": {"message": "slow down"}}'],
                  headers={"content-type": "application/json", **headers})
    error = mocked_failure(client, {"model": "m", "messages": USER})
    assert (error.type, error.retry_after, error.body) == (
        "rate_limited", seconds, {"error": {"message": "slow down"}}
    )


def test_non_json_error_body_is_kept_as_text() -> None:
    client = mock(502, [b"Bad Gateway"], headers={"content-type": "text/plain"})
    error = mocked_failure(client, STREAM)
    assert (error.type, error.status, error.body) == ("upstream_error", 502, "Bad Gateway")


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


@pytest.mark.parametrize("started", [False, True])
def test_every_httpx_error_is_translated(started: bool) -> None:
    kinds = {"upstream_timeout", "upstream_connection_error", "stream_cut", "invalid_upstream_response"}
    request = httpx.Request("POST", BASE)
    for cls in [httpx.HTTPError, httpx.InvalidURL, *_all_subclasses(httpx.HTTPError)]:
        if cls is httpx.HTTPStatusError:
            exc: Exception = cls("x", request=request, response=httpx.Response(500, request=request))
        else:
            exc = cls("x")
        error = _from_httpx(exc, started=started, partial=None)
        assert error.type in kinds, cls
        assert (error.type == "upstream_timeout") == isinstance(exc, httpx.TimeoutException), cls



class SlowBody(httpx.AsyncByteStream):
    """Keep-alive comments every ``gap_s`` for ``count`` times, then a whole answer."""

    def __init__(self, gap_s: float, count: int) -> None:
        self.gap_s, self.count = gap_s, count

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            await asyncio.sleep(self.gap_s)
            yield b": keep-alive\n\n"
        yield sse(HI, STOP, "[DONE]")


def test_keep_alive_bytes_reset_the_idle_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=SlowBody(0.05, 12))

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            upstream = UpstreamClient(BASE, client=client, idle_timeout=0.4)
            return await upstream.chat_completion(STREAM)

    assert message_of(asyncio.run(main()))["content"] == "Hi"


def test_time_spent_in_callbacks_is_not_idle_time() -> None:
    async def main() -> dict[str, Any]:
        async def slow(delta: Delta) -> None:
            await asyncio.sleep(0.3)

        async with mock(pieces=[sse(HI, HI, STOP, "[DONE]")]) as client:
            upstream = UpstreamClient(BASE, client=client, idle_timeout=0.2)
            return await upstream.chat_completion(STREAM, on_delta=slow)

    assert message_of(asyncio.run(main()))["content"] == "HiHi"


# --- SSE framing (httpx-sse's decoders fed from the body's reads) ---------------------------------

WIDE = {**HEAD, "choices": [{"index": 0, "delta": {"content": "é€😀\u2028x"}, "finish_reason": None}]}


def _framed(newline: bytes) -> bytes:
    body = b": a comment\n" + sse(HI, WIDE) + b"event: ignored\n" + sse(STOP, "[DONE]")
    return body.replace(b"\n", newline)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1 << 16])
def test_any_line_ending_and_any_read_boundary(newline: bytes, size: int) -> None:
    """Reads split anywhere (inside a UTF-8 sequence, between \\r and \\n) give the same text."""
    body = _framed(newline)
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    completion = mocked(mock(pieces=pieces), STREAM)
    assert message_of(completion)["content"] == "Hié€😀\u2028x"
    assert completion["choices"][0]["finish_reason"] == "stop"


def test_a_compressed_stream_is_decoded() -> None:
    import gzip

    body = gzip.compress(_framed(b"\n"))
    pieces = [body[: len(body) // 2], body[len(body) // 2 :]]
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    completion = mocked(mock(pieces=pieces, headers=headers), STREAM)
    assert message_of(completion)["content"] == "Hié€😀\u2028x"
