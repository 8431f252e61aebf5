"""The SSE response: chunks in order then the tail; with ``watch_disconnect`` a body that would
go on forever stops when the client's ``http.disconnect`` arrives, its iterator closed."""

from __future__ import annotations

import asyncio

from gateway.http.sse_response import EventStreamResponse


def _asgi(disconnect_after_s: float | None):
    sent: list[dict] = []

    async def receive():
        if disconnect_after_s is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    return receive, send, sent


def test_chunks_then_tail_then_end():
    async def chunks():
        yield b"event: a\ndata: {}\n\n"
        yield b"event: b\ndata: {}\n\n"

    async def main():
        receive, send, sent = _asgi(None)
        await EventStreamResponse(chunks(), tail=b"data: [DONE]\n\n", headers={"X-Extra": "1"})(
            {"type": "http"}, receive, send
        )
        return sent

    sent = asyncio.run(main())
    start, *bodies = sent
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-extra", b"1") in start["headers"]
    assert [m["body"] for m in bodies] == [
        b"event: a\ndata: {}\n\n", b"event: b\ndata: {}\n\n", b"data: [DONE]\n\n"
    ]
    assert [m["more_body"] for m in bodies] == [True, True, False]


def test_watch_disconnect_stops_an_endless_body_and_closes_it():
    closed = []

    async def endless():
        try:
            while True:
                yield b": keep-alive\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def main():
        receive, send, sent = _asgi(0.1)
        response = EventStreamResponse(endless(), tail=b"data: [DONE]\n\n", watch_disconnect=True)
        await asyncio.wait_for(response({"type": "http"}, receive, send), 5)
        return sent

    sent = asyncio.run(main())
    assert closed == [True]
    assert 1 < len(sent) < 100 and sent[-1].get("more_body") is True  # cut off, no tail


def test_a_client_gone_on_a_spec_2_4_server_ends_the_body():
    closed = []

    async def chunks():
        try:
            for _ in range(100):
                yield b"data: x\n\n"
        finally:
            closed.append(True)

    async def main():
        calls = 0

        async def send(message):
            nonlocal calls
            calls += 1
            if calls > 2:
                raise OSError("client gone")

        await EventStreamResponse(chunks())({"type": "http"}, None, send)
        return calls

    assert asyncio.run(main()) == 3 and closed == [True]


def test_the_last_chunk_goes_out_with_the_tail_and_nothing_more_is_asked_for():
    from gateway.engine.live import ends_stream
    from gateway.protocol.sse import encode_event

    asked = []

    async def chunks():
        delta = encode_event({"type": "response.output_text.delta", "sequence_number": 0, "delta": "x"})
        completed = encode_event({"type": "response.completed", "sequence_number": 1, "response": {}})
        asked.append(1)
        yield delta
        asked.append(2)
        yield delta + completed
        asked.append(3)  # never: the terminal event ended the body
        yield b": keep-alive\n\n"

    async def main():
        receive, send, sent = _asgi(None)
        await EventStreamResponse(chunks(), tail=b"data: [DONE]\n\n", ends=ends_stream)(
            {"type": "http"}, receive, send
        )
        return sent

    _, *bodies = asyncio.run(main())
    assert [m["more_body"] for m in bodies] == [True, False]
    assert bodies[-1]["body"].startswith(b"event: response.output_text.delta\n")
    assert bodies[-1]["body"].endswith(b"event: response.completed\ndata: "
                                       b'{"type":"response.completed","sequence_number":1,"response":{}}\n\n'
                                       b"data: [DONE]\n\n")
    assert asked == [1, 2]


def test_ends_stream_looks_at_the_last_event_only():
    from gateway.engine.live import ends_stream
    from gateway.protocol.sse import encode_event

    def ev(kind, **fields):
        return encode_event({"type": kind, "sequence_number": 0, **fields})

    assert ends_stream(ev("response.completed", response={}))
    assert ends_stream(ev("response.output_text.delta", delta="event: response.completed\n") + ev("response.failed"))
    assert not ends_stream(ev("response.completed") + ev("response.output_text.delta", delta="x"))
    assert not ends_stream(ev("response.output_text.delta", delta="\n\nevent: response.completed\n"))
    assert not ends_stream(b": keep-alive\n\n")
