"""WebSocket mode (``ws://…/v1/responses``) with the real openai SDK's ``responses.connect()``
and a raw ``websockets`` client, against a real uvicorn gateway and a scripted upstream."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway

# Run on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

MODEL = "scripted-model"
TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")
TOOL = {
    "type": "function",
    "name": "next_step",
    "description": "Returns the next step's value",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
}


@pytest.fixture
def gw(tmp_path):
    with running_gateway(tmp_path, upstream_max_retries=0) as running:
        yield running


def until_terminal(connection) -> list:
    events = []
    for event in connection:
        events.append(event)
        if event.type in TERMINAL:
            return events
    raise AssertionError(f"the connection closed after {[e.type for e in events]}")


def raw_until_terminal(ws) -> list[dict]:
    events = []
    while True:
        event = orjson.loads(ws.recv(timeout=30))
        events.append(event)
        if event["type"] in TERMINAL:
            return events


def ws_url(gw) -> str:
    return gw.url.replace("http://", "ws://") + "/v1/responses"


def test_events_are_the_sse_events_and_the_response_is_stored(gw):
    gw.model.replies.append(Reply(content="Hello over a socket", chunk_size=5))
    gw.model.replies.append(Reply(content="Hello over a socket", chunk_size=5))
    client = gw.client()
    with client.responses.connect() as connection:
        connection.response.create(model=MODEL, input="Say hello")
        events = until_terminal(connection)
    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        sse = list(stream)
    assert [e.type for e in events] == [e.type for e in sse]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "Hello over a socket"
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == "Hello over a socket"
    assert gw.model.requests[0]["messages"] == [{"role": "user", "content": "Say hello"}]


def test_twenty_turn_client_tool_loop_over_one_connection(gw):
    turns = 20
    for n in range(turns):
        gw.model.replies.append(
            Reply(tool_calls=[{"id": f"call_{n}", "name": "next_step", "arguments": f'{{"n": {n}}}'}])
        )
    gw.model.replies.append(Reply(content="All 20 steps done"))
    client = gw.client()
    previous = None
    with client.responses.connect() as connection:
        connection.response.create(model=MODEL, input="Run the steps", tools=[TOOL], store=False)
        for n in range(turns + 1):
            events = until_terminal(connection)
            response = events[-1].response
            assert response.status == "completed", events[-1]
            assert previous is None or response.previous_response_id == previous
            previous = response.id
            calls = [item for item in response.output if item.type == "function_call"]
            if n == turns:
                assert not calls
                assert response.output_text == "All 20 steps done"
                break
            assert [c.call_id for c in calls] == [f"call_{n}"]
            connection.response.create(
                model=MODEL,
                tools=[TOOL],
                store=False,
                previous_response_id=response.id,
                input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                        "output": f"value {n}"}],
            )
    last = gw.model.requests[-1]["messages"]
    # The whole conversation reached the upstream: the user turn, then 20 call/output pairs.
    assert last[0] == {"role": "user", "content": "Run the steps"}
    tool_messages = [m for m in last if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == [f"call_{n}" for n in range(turns)]
    assert tool_messages[-1]["content"] == f"value {turns - 1}"
    # store: false responses are not readable over HTTP.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(previous)


def test_store_false_responses_continue_only_on_their_connection(gw):
    client = gw.client()
    with client.responses.connect() as connection:
        connection.response.create(model=MODEL, input="first", store=False)
        first = until_terminal(connection)[-1].response
        connection.response.create(model=MODEL, input="second", previous_response_id=first.id)
        second = until_terminal(connection)[-1].response
        assert second.status == "completed"
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == [
        "first", "Echo: first", "second"
    ]
    with client.responses.connect() as connection:
        connection.response.create(model=MODEL, input="again", previous_response_id=first.id)
        (error,) = until_terminal(connection)
        assert error.type == "error" and error.status == 400
        assert error.error.code == "previous_response_not_found"
        assert error.error.param == "previous_response_id"
        # Stored responses continue on any connection.
        connection.response.create(model=MODEL, input="third", previous_response_id=second.id)
        assert until_terminal(connection)[-1].response.status == "completed"
    assert [m["content"] for m in gw.model.requests[-1]["messages"]][-3:] == [
        "second", "Echo: second", "third"
    ]


def test_a_failed_continuation_evicts_its_cache_entry(gw):
    client = gw.client()
    with client.responses.connect() as connection:
        connection.response.create(model=MODEL, input="first", store=False)
        first = until_terminal(connection)[-1].response
        gw.model.replies.append(Reply(status=500))
        connection.response.create(model=MODEL, input="second", previous_response_id=first.id)
        failed = until_terminal(connection)[-1]
        assert failed.type == "response.failed"
        connection.response.create(model=MODEL, input="retry", previous_response_id=first.id)
        (error,) = until_terminal(connection)
        assert error.error.code == "previous_response_not_found"


def test_a_second_create_while_one_runs_is_an_error_event(gw):
    gw.model.replies.append(Reply(content="slow " * 20, chunk_size=5, chunk_delay_s=0.03))
    with connect(ws_url(gw), open_timeout=30) as ws:
        ws.send(orjson.dumps({"type": "response.create", "model": MODEL, "input": "one"}).decode())
        ws.send(orjson.dumps({"type": "response.create", "model": MODEL, "input": "two"}).decode())
        events = raw_until_terminal(ws)
        errors = [e for e in events if e["type"] == "error"]
        assert len(errors) == 1
        assert errors[0]["status"] == 409
        assert errors[0]["error"]["code"] == "response_in_progress"
        # The first response goes on to its end; then the connection takes the next one.
        rest = raw_until_terminal(ws)
        assert rest[-1]["type"] == "response.completed"
        assert rest[-1]["response"]["output"][0]["content"][0]["text"] == "slow " * 20
        ws.send(orjson.dumps({"type": "response.create", "model": MODEL, "input": "three"}).decode())
        assert raw_until_terminal(ws)[-1]["type"] == "response.completed"
    assert len(gw.model.requests) == 2


@pytest.mark.parametrize(
    ("message", "status", "code"),
    [
        pytest.param("{not json", 400, "invalid_json", id="not-json"),
        pytest.param('["response.create"]', 400, "invalid_type", id="not-an-object"),
        pytest.param('{"type": "response.cancel"}', 400, "unknown_event_type", id="unknown-type"),
        pytest.param('{"type": "response.steer", "previous_response_id": "resp_1", "input": []}',
                     400, "unsupported_event_type", id="steer"),
        pytest.param('{"type": "response.create", "input": "x"}', 400, None, id="no-model"),
        pytest.param(
            '{"type": "response.create", "model": "m", "background": true}', 400, None,
            id="background",
        ),
        pytest.param(
            '{"type": "response.create", "model": "m", "input": "' + "x" * 5000 + '"}', 413, None,
            id="over-max-body-bytes",
        ),
    ],
)
def test_bad_messages_get_an_error_event_and_the_connection_stays_usable(tmp_path, message, status, code):
    with running_gateway(tmp_path, max_body_bytes=4000) as gw:
        with connect(ws_url(gw), open_timeout=30) as ws:
            ws.send(message)
            error = orjson.loads(ws.recv(timeout=30))
            assert error["type"] == "error" and error["status"] == status
            assert set(error["error"]) >= {"type", "code", "message", "param"}
            if code is not None:
                assert error["error"]["code"] == code
            ws.send(orjson.dumps({"type": "response.create", "model": MODEL, "input": "ok"}).decode())
            assert raw_until_terminal(ws)[-1]["type"] == "response.completed"
        assert len(gw.model.requests) == 1  # nothing that failed validation reached the upstream


def test_a_frame_over_the_servers_limit_closes_with_1009(gw):
    with connect(ws_url(gw), open_timeout=30, max_size=None) as ws:
        ws.send("x" * (17 * 1024 * 1024))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=60)
    assert info.value.rcvd.code == 1009


def test_stream_id_is_echoed_on_every_event(gw):
    with connect(ws_url(gw), open_timeout=30) as ws:
        create = {"type": "response.create", "model": MODEL, "input": "hi", "stream_id": "lane-1"}
        ws.send(orjson.dumps(create).decode())
        events = raw_until_terminal(ws)
    assert {e["stream_id"] for e in events} == {"lane-1"}
    assert events[-1]["response"]["status"] == "completed"


def test_a_client_that_disconnects_mid_response_does_not_stop_it(gw):
    text = "".join(f"word{i} " for i in range(60))
    gw.model.replies.append(Reply(content=text, chunk_size=7, chunk_delay_s=0.02))
    with connect(ws_url(gw), open_timeout=30) as ws:
        ws.send(orjson.dumps({"type": "response.create", "model": MODEL, "input": "x"}).decode())
        response_id = None
        while True:
            event = orjson.loads(ws.recv(timeout=30))
            if event["type"] == "response.created":
                response_id = event["response"]["id"]
            if event["type"] == "response.output_text.delta":
                break
    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(f"{gw.url}/v1/responses/{response_id}").json()
        if body["status"] not in ("queued", "in_progress"):
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == text


def test_keys_and_tenants_apply_to_the_upgrade_request(tmp_path):
    with running_gateway(tmp_path, api_keys="key-a,key-b") as gw:
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(gw), open_timeout=30, additional_headers={"Authorization": "Bearer nope"})
        assert info.value.response.status_code == 401
        client_a = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="key-a", max_retries=0)
        client_b = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="key-b", max_retries=0)
        gw.clients.callback(client_a.close)
        gw.clients.callback(client_b.close)
        with client_a.responses.connect() as connection:
            connection.response.create(model=MODEL, input="mine")
            mine = until_terminal(connection)[-1].response
        assert client_a.responses.retrieve(mine.id).id == mine.id
        with pytest.raises(openai.NotFoundError):
            client_b.responses.retrieve(mine.id)
        with client_b.responses.connect() as connection:
            connection.response.create(model=MODEL, input="x", previous_response_id=mine.id)
            (error,) = until_terminal(connection)
            assert error.error.code == "previous_response_not_found"


def test_the_async_sdk_connection(gw):
    gw.model.replies.append(Reply(content="async hello"))

    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="test", max_retries=0)
        events = []
        async with client.responses.connect() as connection:
            await connection.response.create(model=MODEL, input="hi")
            async for event in connection:
                events.append(event)
                if event.type in TERMINAL:
                    break
        await client.close()
        return events

    events = asyncio.run(main())
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "async hello"


def test_generate_false_stores_state_without_a_model_call(gw):
    client = gw.client()
    with client.responses.connect() as connection:
        connection.response.create(
            model=MODEL, input="Context for later.", instructions="Be brief.", generate=False
        )
        events = until_terminal(connection)
        warm = events[-1].response
        assert [e.type for e in events] == ["response.created", "response.in_progress", "response.completed"]
        assert warm.status == "completed" and warm.output == []
        assert gw.model.requests == []
        connection.response.create(model=MODEL, input="Now answer.", previous_response_id=warm.id)
        answer = until_terminal(connection)[-1].response
    assert answer.output_text == "Echo: Now answer."
    assert [m["content"] for m in gw.model.requests[-1]["messages"]] == ["Context for later.", "Now answer."]


def test_stepchain_serve_answers_messages_past_uvicorns_default_limit(tmp_path):
    """A real ``stepchain serve`` process sizes its WebSocket limit from ``max_body_bytes``: a
    17.5 MiB message (past uvicorn's 16 MiB default) over a 17 MiB ``max_body_bytes`` gets an
    error event, and the socket stays usable, instead of a 1009 close."""
    from tests.gateway.harness import serve_process
    from tests.servers import serve_scripted_upstream

    limit = 17 * 1024 * 1024
    with serve_scripted_upstream() as upstream, serve_process(
        ["--db", str(tmp_path / "s.db"), "--upstream-base-url", upstream.base_url,
         "--max-body-bytes", str(limit)],
        tmp_path / "serve.log",
    ) as (url, _proc):
        with connect(url.replace("http://", "ws://") + "/v1/responses", open_timeout=30,
                     max_size=None) as ws:
            ws.send("x" * (limit + 512 * 1024))
            error = orjson.loads(ws.recv(timeout=60))
            assert error["type"] == "error" and error["status"] == 413
            ws.send(orjson.dumps({"type": "response.create", "model": MODEL, "input": "ok"}).decode())
            assert raw_until_terminal(ws)[-1]["type"] == "response.completed"
