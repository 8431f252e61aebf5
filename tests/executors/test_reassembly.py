"""The stream reassembler: any split of a completion, as chunks or as SSE bytes, reassembles to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from executors.reassembly import Delta, Reassembler, StreamCutError
from executors.upstream import UpstreamClient, UpstreamError

# --- strategies ---------------------------------------------------------------------------------

# orjson refuses lone surrogates, and so does every real upstream.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
NAME = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True)
USAGE = st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
        "total_tokens": st.integers(0, 10**6),
    }
)


@st.composite
def completions(draw: st.DrawFn) -> dict[str, Any]:
    """A reassembled completion in the exact shape the Reassembler returns."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": draw(st.none() | TEXT),
        "refusal": draw(st.none() | TEXT),
    }
    reasoning = draw(st.none() | TEXT.filter(bool))
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = draw(st.lists(st.tuples(NAME, NAME, TEXT), max_size=5))
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}_{cid}", "type": "function",
             "function": {"name": name, "arguments": arguments}}
            for i, (cid, name, arguments) in enumerate(calls)
        ]
    completion: dict[str, Any] = {
        "id": "chatcmpl-" + draw(NAME),
        "object": "chat.completion",
        "created": draw(st.integers(1, 2**31)),
        "model": draw(NAME),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
            }
        ],
        "usage": draw(st.none() | USAGE),
    }
    if draw(st.booleans()):
        completion["system_fingerprint"] = "fp_" + draw(NAME)
    return completion


def _split(draw: st.DrawFn, text: str) -> list[str]:
    """Random pieces of ``text`` (possibly with empty pieces) that join back to it."""
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=4)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def streams(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(completion, chunks, with_done): a completion and one of the many ways to stream it."""
    completion = draw(completions())
    message = completion["choices"][0]["message"]
    head = {"id": completion["id"], "object": "chat.completion.chunk",
            "created": completion["created"], "model": completion["model"]}
    if "system_fingerprint" in completion:
        head["system_fingerprint"] = completion["system_fingerprint"]

    deltas: list[dict[str, Any]] = [{"role": "assistant"}]
    if message["content"] is None and draw(st.booleans()):
        deltas[0]["content"] = None  # the null-content quirk
    for key, text in (
        ("reasoning_content", message.get("reasoning_content")),
        ("content", message["content"]),
        ("refusal", message["refusal"]),
    ):
        if text is not None:
            deltas.extend({key: piece} for piece in _split(draw, text))
    for index, call in enumerate(message.get("tool_calls", [])):
        pieces = _split(draw, call["function"]["arguments"])
        first: dict[str, Any] = {"index": index, "id": call["id"],
                                 "function": {"name": call["function"]["name"]}}
        if draw(st.booleans()):
            first["type"] = "function"
        if draw(st.booleans()):  # the first piece also carries arguments (a whole call if only one)
            first["function"]["arguments"] = pieces.pop(0)
        elif draw(st.booleans()):
            first["function"]["arguments"] = ""
        deltas.append({"tool_calls": [first]})
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces
        )

    # Merge neighbours that touch different keys into one chunk, at random.
    merged: list[dict[str, Any]] = []
    for delta in deltas:
        if merged and not (merged[-1].keys() & delta.keys()) and draw(st.booleans()):
            merged[-1] = {**merged[-1], **delta}
        else:
            merged.append(delta)
    chunks = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in merged]

    finish_reason = completion["choices"][0]["finish_reason"]
    if draw(st.booleans()):
        chunks[-1]["choices"][0]["finish_reason"] = finish_reason
    else:
        chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
    usage = completion["usage"]
    if usage is not None:
        if draw(st.booleans()):
            chunks.append({**head, "choices": [], "usage": usage})
        else:
            chunks[-1]["usage"] = usage
    for _ in range(draw(st.integers(0, 2))):  # empty-choices chunks anywhere (Azure filter results)
        at = draw(st.integers(0, len(chunks)))
        chunks.insert(at, {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                           "prompt_filter_results": []})
    return completion, chunks, draw(st.booleans())


def _expected_deltas_check(completion: dict[str, Any], deltas: list[Delta]) -> None:
    message = completion["choices"][0]["message"]
    for kind, key in (("content", "content"), ("refusal", "refusal"), ("reasoning", "reasoning_content")):
        assert "".join(d.text for d in deltas if d.kind == kind) == (message.get(key) or "")
    assert all(d.text for d in deltas if d.kind != "tool_call")
    for index, call in enumerate(message.get("tool_calls", [])):
        mine = [d for d in deltas if d.kind == "tool_call" and d.index == index]
        assert (mine[0].call_id, mine[0].name) == (call["id"], call["function"]["name"])
        assert all(d.call_id is None and d.name is None and d.text for d in mine[1:])
        assert "".join(d.text for d in mine) == call["function"]["arguments"]


def reassemble(chunks: list[dict[str, Any]], saw_done: bool = True) -> tuple[dict[str, Any], list[Delta]]:
    r = Reassembler()
    deltas = [d for chunk in chunks for d in r.feed(chunk)]
    deltas += r.flush()
    return r.finish(saw_done), deltas


# --- the properties -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(streams())
def test_any_chunking_reassembles_to_the_completion(stream: Any) -> None:
    completion, chunks, _ = stream
    got, deltas = reassemble(chunks, saw_done=False)
    assert got == completion
    _expected_deltas_check(completion, deltas)


class PiecesStream(httpx.AsyncByteStream):
    """A response body delivered in exactly these network reads."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def sse_client(pieces: list[bytes], content_type: str = "text/event-stream") -> UpstreamClient:
    """An UpstreamClient whose transport answers every request with ``pieces`` as the body."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, stream=PiecesStream(pieces))

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return UpstreamClient("http://127.0.0.1:9/v1", client=client)


def run_stream(pieces: list[bytes]) -> tuple[dict[str, Any], list[Delta], list[dict[str, Any]]]:
    """Stream ``pieces`` through UpstreamClient + httpx + httpx-sse; return (completion, deltas, chunks)."""
    deltas: list[Delta] = []
    chunks: list[dict[str, Any]] = []

    async def on_delta(delta: Delta) -> None:
        deltas.append(delta)

    async def on_chunk(chunk: dict[str, Any]) -> None:
        chunks.append(chunk)

    async def main() -> dict[str, Any]:
        upstream = sse_client(pieces)
        try:
            return await upstream.chat_completion(
                {"model": "m", "messages": [], "stream": True}, on_delta=on_delta, on_chunk=on_chunk
            )
        finally:
            await upstream._client.aclose()

    return asyncio.run(main()), deltas, chunks


@st.composite
def sse_bytes(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]], list[bytes]]:
    completion, chunks, with_done = draw(streams())
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    prefix = draw(st.sampled_from([b"data: ", b"data:"]))
    body = b""
    for chunk in chunks:
        if draw(st.integers(0, 4)) == 0:
            body += b": keep-alive" + eol + eol
        body += prefix + orjson.dumps(chunk) + eol + eol
    if with_done:
        body += prefix + b"[DONE]" + eol + eol
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(body) - 1, 1)), max_size=12))))
    bounds = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    return completion, chunks, pieces


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sse_bytes())
def test_any_split_of_the_sse_bytes_reassembles_to_the_completion(case: Any) -> None:
    completion, chunks, pieces = case
    got, deltas, seen_chunks = run_stream(pieces)
    assert got == completion
    assert seen_chunks == chunks
    _expected_deltas_check(completion, deltas)


# --- explicit quirks ----------------------------------------------------------------------------

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**HEAD, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}], **extra}


def text_of(completion: dict[str, Any]) -> str | None:
    return completion["choices"][0]["message"]["content"]


def test_finished_by_finish_reason_without_done() -> None:
    r = Reassembler()
    r.feed(chunk({"role": "assistant", "content": "Hi"}))
    r.feed(chunk({}, "stop"))
    assert text_of(r.finish(saw_done=False)) == "Hi"


def test_finished_by_done_without_finish_reason() -> None:
    r = Reassembler()
    r.feed(chunk({"content": "Hi"}))
    completion = r.finish(saw_done=True)
    assert text_of(completion) == "Hi"
    assert completion["choices"][0]["finish_reason"] is None


def test_a_cut_off_stream_raises_and_keeps_the_partial_text() -> None:
    r = Reassembler()
    r.feed(chunk({"role": "assistant", "content": "The answer is"}))
    with pytest.raises(StreamCutError):
        r.finish(saw_done=False)
    assert text_of(r.partial()) == "The answer is"


def test_azure_first_chunk_with_empty_fields_does_not_hide_the_real_ones() -> None:
    r = Reassembler()
    assert r.feed({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                   "prompt_filter_results": [{"prompt_index": 0}]}) == []
    r.feed(chunk({"content": "ok"}, "stop"))
    completion = r.finish(saw_done=True)
    assert (completion["id"], completion["model"], completion["created"]) == ("chatcmpl-1", "m", 1)


def test_usage_chunk_with_empty_choices() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    completion, _ = reassemble([chunk({"content": "x"}, "stop"), {**HEAD, "choices": [], "usage": usage}])
    assert completion["usage"] == usage


def test_null_content_stays_null_and_empty_content_stays_empty() -> None:
    assert text_of(reassemble([chunk({"role": "assistant", "content": None}, "stop")])[0]) is None
    assert text_of(reassemble([chunk({"role": "assistant", "content": ""}, "stop")])[0]) == ""


@pytest.mark.parametrize("field", [pytest.param("reasoning_content", id="reasoning_content"),
                                   pytest.param("reasoning", id="reasoning")])
def test_reasoning_deltas(field: str) -> None:
    completion, deltas = reassemble([chunk({field: "Let me "}), chunk({field: "think."}),
                                     chunk({"content": "42"}, "stop")])
    assert completion["choices"][0]["message"]["reasoning_content"] == "Let me think."
    assert [d.kind for d in deltas] == ["reasoning", "reasoning", "content"]


def test_reasoning_given_as_an_object_is_not_text() -> None:
    completion, deltas = reassemble([chunk({"reasoning": {"summary": "x"}, "content": "a"}, "stop")])
    assert "reasoning_content" not in completion["choices"][0]["message"]
    assert [d.kind for d in deltas] == ["content"]


def test_whole_tool_call_in_one_chunk() -> None:
    call = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    completion, deltas = reassemble([chunk({"tool_calls": [call]}, "tool_calls")])
    assert deltas == [Delta("tool_call", '{"city":"Oslo"}', 0, "call_a", "get_weather")]
    assert completion["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    ]


def test_empty_argument_pieces_emit_nothing() -> None:
    r = Reassembler()
    first = r.feed(chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": ""}}]}))
    assert first == [Delta("tool_call", "", 0, "call_a", "f")]
    assert r.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]})) == []
    assert r.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})) == [
        Delta("tool_call", "{}", 0)
    ]


def test_name_before_id_is_held_until_both_are_known() -> None:
    r = Reassembler()
    assert r.feed(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]})) == []
    assert r.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1"}}]})) == []
    assert r.feed(chunk({"tool_calls": [{"index": 0, "id": "call_late", "function": {"arguments": "}"}}]})) == [
        Delta("tool_call", '{"a":1}', 0, "call_late", "f")
    ]
    completion = r.finish(saw_done=True)
    assert completion["choices"][0]["message"]["tool_calls"][0]["id"] == "call_late"


def test_a_call_that_never_gets_an_id_gets_a_synthesised_one() -> None:
    r = Reassembler()
    assert r.feed(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]})) == []
    (delta,) = r.feed(chunk({}, "tool_calls"))
    assert delta.call_id is not None and delta.call_id.startswith("call_") and delta.name == "f"
    completion = r.finish(saw_done=False)
    assert completion["choices"][0]["message"]["tool_calls"][0]["id"] == delta.call_id


def test_held_call_is_announced_when_the_next_call_starts() -> None:
    r = Reassembler()
    r.feed(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}))
    out = r.feed(chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g"}}]}))
    assert [(d.index, d.name) for d in out] == [(0, "f"), (1, "g")]
    assert out[0].call_id and out[0].call_id.startswith("call_")


def test_held_call_is_flushed_at_the_end_of_a_done_stream() -> None:
    r = Reassembler()
    r.feed(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}))
    (delta,) = r.flush()
    assert (delta.name, delta.text) == ("f", "{}")
    assert r.finish(saw_done=True)["choices"][0]["message"]["tool_calls"][0]["id"] == delta.call_id


def test_tool_calls_are_ordered_by_index() -> None:
    completion, _ = reassemble([
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": "{}"}}]}, "tool_calls"),
    ])
    assert [c["id"] for c in completion["choices"][0]["message"]["tool_calls"]] == ["call_a", "call_b"]


def test_tool_call_pieces_without_index() -> None:
    completion, _ = reassemble([
        chunk({"tool_calls": [{"id": "call_a", "function": {"name": "f", "arguments": "{"}}]}),
        chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
        chunk({"tool_calls": [{"id": "call_b", "function": {"name": "g", "arguments": "[]"}}]}, "tool_calls"),
    ])
    calls = completion["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [("call_a", "{}"), ("call_b", "[]")]


def test_arguments_sent_as_an_object_become_a_json_string() -> None:
    call = {"index": 0, "id": "call_a", "function": {"name": "f", "arguments": {"x": 1}}}
    completion, _ = reassemble([chunk({"tool_calls": [call]}, "tool_calls")])
    assert completion["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"x":1}'


def test_other_choices_are_ignored() -> None:
    other = {**HEAD, "choices": [{"index": 1, "delta": {"content": "nope"}, "finish_reason": "stop"}]}
    r = Reassembler()
    assert r.feed(other) == []
    r.feed(chunk({"content": "yes"}))
    with pytest.raises(StreamCutError):  # choice 1 finishing does not finish choice 0
        r.finish(saw_done=False)
    r.feed(chunk({}, "stop"))
    assert text_of(r.finish(saw_done=False)) == "yes"


# --- explicit quirks on the wire ----------------------------------------------------------------

WIRE = [chunk({"role": "assistant", "content": "Hé"}), chunk({"content": "llo"}),
        chunk({}, "stop"), {**HEAD, "choices": [], "usage": {"prompt_tokens": 1}}]


def wire(eol: bytes = b"\n", prefix: bytes = b"data: ", done: bool = True, keep_alive: bool = False) -> bytes:
    out = b""
    for c in WIRE:
        if keep_alive:
            out += b": keep-alive" + eol + eol
        out += prefix + orjson.dumps(c) + eol + eol
    return out + (prefix + b"[DONE]" + eol + eol if done else b"")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(wire(), id="plain"),
        pytest.param(wire(eol=b"\r\n"), id="crlf"),
        pytest.param(wire(eol=b"\r"), id="cr"),
        pytest.param(wire(prefix=b"data:"), id="data-without-space"),
        pytest.param(wire(keep_alive=True), id="keep-alive-comments"),
        pytest.param(wire(done=False), id="no-done"),
    ],
)
def test_wire_quirks(body: bytes) -> None:
    # One byte per read: every boundary, including inside "é" and between \r and \n.
    completion, deltas, _ = run_stream([body[i : i + 1] for i in range(len(body))])
    assert text_of(completion) == "Héllo"
    assert completion["usage"] == {"prompt_tokens": 1}
    assert [d.text for d in deltas] == ["Hé", "llo"]


def test_a_cut_off_wire_stream_is_a_stream_cut_error_with_partial_text() -> None:
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in WIRE[:2])
    with pytest.raises(UpstreamError) as info:
        run_stream([body])
    assert info.value.type == "stream_cut"
    assert info.value.partial is not None and text_of(info.value.partial) == "Héllo"


def test_an_event_cut_mid_line_is_not_used() -> None:
    body = b"data: " + orjson.dumps(WIRE[0]) + b"\n\ndata: " + orjson.dumps(chunk({}, "stop"))
    with pytest.raises(UpstreamError) as info:
        run_stream([body])
    assert info.value.type == "stream_cut"
