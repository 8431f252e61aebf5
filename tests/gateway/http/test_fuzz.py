"""Fuzzing the real app: generated bodies, ids and query strings never produce a 5xx or a traceback.

One gateway (real uvicorn, scripted upstream that answers a short text) serves the whole module,
once on SQLite in a temporary directory and once on PostgreSQL; hypothesis drives a few thousand
requests through one keep-alive ``httpx.Client`` (a third as many on PostgreSQL: the code paths
are the same, the second run checks what that store makes of the odd values). Every reply must be: below 500 (502 only when the upstream failed),
JSON (or, for an accepted stream, well-formed SSE ending in ``[DONE]``), an exact OpenAI error body
for every error status, and free of Python tracebacks.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.http.bodies import MAX_DEPTH
from gateway.testing.scripted_upstream import Reply, ScriptedModel
from tests.gateway.harness import running_gateway

MODEL = "scripted-model"
ADMIN_KEY = "fuzz-admin-key"
JSON_HEADERS = {"content-type": "application/json"}
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_KEY}"}
MAX_BODY_BYTES = 64_000
TERMINAL = {"response.completed", "response.failed", "response.incomplete"}
TRACEBACK_MARKERS = ("Traceback", 'File "')
Headers = dict[str, str] | None

FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
#: On PostgreSQL each property runs on a third of its SQLite examples (at least 30).
PG_EXAMPLES_DIVISOR = 3


def fuzzed(max_examples: int, **strategies: st.SearchStrategy[Any]) -> Callable[..., Any]:
    """``@settings(FUZZ, max_examples=…) @given(**strategies)`` for a test ``(fuzz, **drawn)``:
    ``max_examples`` on SQLite, a :data:`PG_EXAMPLES_DIVISOR`-th of them on PostgreSQL."""

    def decorate(body: Callable[..., None]) -> Callable[[Fuzz], None]:
        on_pg = max(30, max_examples // PG_EXAMPLES_DIVISOR)
        runs = {
            "sqlite": settings(FUZZ, max_examples=max_examples)(given(**strategies)(body)),
            "postgres": settings(FUZZ, max_examples=on_pg)(given(**strategies)(body)),
        }

        def test(fuzz: Fuzz) -> None:
            runs[fuzz.backend](fuzz)

        test.__name__ = test.__qualname__ = body.__name__
        test.__doc__ = body.__doc__
        return test

    return decorate


# -- the gateway under test ---------------------------------------------------------------------


@dataclass
class Fuzz:
    http: httpx.Client
    model: ScriptedModel
    response_ids: list[str]  # stored responses to use as ids and previous_response_id
    call_ids: list[str]  # call_ids of function_call items in the first one
    backend: str  # "sqlite" or "postgres"


def _short_text(body: dict[str, Any]) -> Reply:
    return Reply(content="ok")


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, backend: str, module_db: str) -> Iterator[Fuzz]:
    model = ScriptedModel(default=_short_text, record=False)
    tmp = tmp_path_factory.mktemp("fuzz")
    # No upstream retries: junk chat bodies crash the scripted upstream (a 502 is fine), and
    # backing off between retries would only make the fuzzing slow.
    settings = {"max_body_bytes": MAX_BODY_BYTES, "admin_key": ADMIN_KEY, "upstream_max_retries": 0}
    with running_gateway(tmp, model, db=module_db, **settings) as gw:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            model.replies.append(
                Reply(tool_calls=[{"id": "call_seed", "name": "get_weather", "arguments": "{}"}])
            )
            tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
            first = http.post(
                "/v1/responses", json={"model": MODEL, "input": "hi", "tools": [tool]}
            )
            second = http.post(
                "/v1/responses",
                json={
                    "model": MODEL,
                    "previous_response_id": first.json()["id"],
                    "input": [
                        {"type": "function_call_output", "call_id": "call_seed", "output": "5"}
                    ],
                },
            )
            assert first.status_code == second.status_code == 200, (first.text, second.text)
            ids = [first.json()["id"], second.json()["id"]]
            yield Fuzz(http, model, ids, ["call_seed"], backend)


# -- what every reply must look like ------------------------------------------------------------


def _assert_error_body(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def _assert_sse(content: bytes, first: int = 0) -> None:
    """Responses events in order: sequence numbers from ``first`` (0, or after a resume's
    ``starting_after``), a terminal event, then ``[DONE]``."""
    assert content.endswith(b"data: [DONE]\n\n"), content[-200:]
    blocks = content[: -len(b"data: [DONE]\n\n")].split(b"\n\n")
    assert blocks.pop() == b""
    types = []
    for sequence, block in enumerate(blocks, start=first):
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: "), block
        event = orjson.loads(data_line[len(b"data: ") :])
        assert event["type"] == event_line[len(b"event: ") :].decode()
        assert event["sequence_number"] == sequence
        types.append(event["type"])
    if first == 0:
        assert types[:2] == ["response.created", "response.in_progress"], types
    if types or first == 0:
        assert types[-1] in TERMINAL, types


def check(reply: httpx.Response, sent: bytes = b"") -> None:
    """The reply is never a 5xx (but 502), always parseable, errors OpenAI-shaped, no tracebacks."""
    status = reply.status_code
    content = reply.content
    if status >= 500 and status != 502:
        # Let the server finish logging its traceback before pytest renders this failure: on
        # Python 3.11 both parse source with `ast`, which is not thread-safe (INTERNALERROR).
        httpx.get(str(reply.request.url.copy_with(path="/healthz", query=None)))
    for marker in TRACEBACK_MARKERS:
        if marker.encode() not in sent:
            assert marker.encode() not in content, content[:2000]
    assert status < 500 or status == 502, (status, content[:2000], sent[:2000])
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        assert status == 200
        if reply.request.url.path == "/v1/chat/completions":  # data lines only
            assert content.endswith(b"data: [DONE]\n\n"), content[-200:]
            for block in content.split(b"\n\n")[:-2]:
                assert orjson.loads(block[len(b"data: ") :])
        else:
            raw = reply.request.url.params.get("starting_after", "-1")
            first = int(raw) + 1 if raw.lstrip("-").isdigit() and int(raw) >= 0 else 0
            _assert_sse(content, first)
        return
    body = orjson.loads(content)
    if status >= 400:
        _assert_error_body(body)
    else:
        assert isinstance(body, dict)


def post_raw(fz: Fuzz, path: str, sent: bytes, headers: Headers = None) -> httpx.Response:
    reply = fz.http.post(path, content=sent, headers={**JSON_HEADERS, **(headers or {})})
    check(reply, sent)
    return reply


def post_json(fz: Fuzz, path: str, body: Any, headers: Headers = None) -> httpx.Response:
    return post_raw(fz, path, orjson.dumps(body), headers)


# -- strategies ---------------------------------------------------------------------------------

texts = st.text(max_size=24)
names = st.sampled_from(["get_weather", "lookup", "f", "x-y_z"]) | st.text(min_size=1, max_size=10)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
# A wrong value for any typed field: junk of every JSON type, plus odd numbers and strings.
junk = json_values | st.sampled_from(
    [0, -1, 2**64 - 1, -(2**63), 1e308, -1e308, 0.5, "", " ", "\x00", "é" * 300, [], {}, [[]],
     {"": {}}]
)  # fmt: skip


def _message_parts(role: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    text_kind = "output_text" if role == "assistant" else "input_text"
    part = st.builds(lambda t: {"type": text_kind, "text": t}, texts)
    if role == "user":
        part = part | st.builds(
            lambda d: {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": d},
            st.sampled_from(["auto", "low", "high"]),
        )
    return st.lists(part, max_size=3)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["user", "assistant", "system", "developer"]))
    content = draw(texts | _message_parts(role))
    item: dict[str, Any] = {"role": role, "content": content}
    if draw(st.booleans()):
        item["type"] = "message"
    return item


function_calls = st.builds(
    lambda call_id, name, arguments: {
        "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments
    },
    st.sampled_from(["call_a", "call_b"]) | texts.filter(bool),
    names,
    st.just("{}") | texts,
)
reasoning_items = st.builds(
    lambda text: {
        "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]
    },
    texts,
)
mcp_calls = st.builds(
    lambda name, output, call_id: {
        "type": "mcp_call", "id": "mcp_1", "server_label": "stepchain", "name": name,
        "arguments": "{}", "output": output, "error": None, "status": "completed",
        **({"call_id": call_id} if call_id else {}),
    },
    names,
    st.none() | texts,
    st.none() | st.just("call_m"),
)
text_parts = st.lists(st.builds(lambda t: {"type": "input_text", "text": t}, texts), max_size=2)
approval_ids = st.sampled_from(["mcpr_1", "mcpr_unknown"]) | texts
approval_requests = st.builds(
    lambda name, arguments: {
        "type": "mcp_approval_request", "id": "mcpr_1", "server_label": "calc", "name": name,
        "arguments": arguments,
    },
    names,
    st.just("{}") | texts,
)
approval_responses = st.builds(
    lambda request_id, approve, reason: {
        "type": "mcp_approval_response", "approval_request_id": request_id, "approve": approve,
        **({"reason": reason} if reason is not None else {}),
    },
    approval_ids,
    st.booleans(),
    st.none() | texts,
)
tool_filters = st.none() | st.lists(names, max_size=2) | st.builds(
    lambda tool_names, read_only: {
        k: v for k, v in (("tool_names", tool_names), ("read_only", read_only)) if v is not None
    },
    st.none() | st.lists(names, max_size=2),
    st.none() | st.booleans(),
)
# Nothing listens there: listing fails (424), or the URL is refused; never a 5xx.
mcp_tools = st.builds(
    lambda label, url, allowed, approval, headers, authorization: {
        "type": "mcp", "server_label": label, "server_url": url, "allowed_tools": allowed,
        "require_approval": approval, "headers": headers, "authorization": authorization,
    },
    st.sampled_from(["calc", "notes"]) | texts,
    st.sampled_from(["http://127.0.0.1:9/mcp", "http://169.254.169.254/", "http://[::1]:9/sse",
                     "ftp://x", "http://2130706433:9/"]) | texts,
    tool_filters,
    st.sampled_from([None, "always", "never"]) | st.builds(
        lambda a, n: {"always": a, "never": n}, tool_filters, tool_filters
    ),
    st.none() | st.dictionaries(st.sampled_from(["X-Key", "Bad Header"]), texts, max_size=2),
    st.none() | texts,
)


@st.composite
def input_items(draw: st.DrawFn, call_ids: list[str]) -> list[dict[str, Any]]:
    """A list of input items; function_call_output items answer a call earlier in the list, a
    call of the seed response, or (a wrong one) an unknown ``call_id``."""
    items: list[Any] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(
            st.sampled_from(["message", "message", "function_call", "output", "reasoning", "mcp",
                             "approval_request", "approval_response"])
        )
        if kind == "message":
            items.append(draw(messages()))
        elif kind == "function_call":
            items.append(draw(function_calls))
        elif kind == "reasoning":
            items.append(draw(reasoning_items))
        elif kind == "mcp":
            items.append(draw(mcp_calls))
        elif kind == "approval_request":
            items.append(draw(approval_requests))
        elif kind == "approval_response":
            items.append(draw(approval_responses))
        else:
            calls = [i for i in items if i.get("type") in ("function_call", "mcp_call")]
            known = call_ids + [i.get("call_id") or i["id"] for i in calls]
            call_id = draw(st.sampled_from(known) | st.sampled_from(["call_unknown", ""]))
            output = draw(texts | text_parts)
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
    if items and draw(st.booleans()):
        # Break one item: a field of the wrong type, a missing field, an odd type, or junk.
        index = draw(st.integers(0, len(items) - 1))
        item = dict(items[index])
        how = draw(st.sampled_from(["field", "drop", "type", "replace"]))
        if how == "field":
            item[draw(st.sampled_from(sorted(item) + ["id", "status", "call_id"]))] = draw(junk)
        elif how == "drop":
            item.pop(draw(st.sampled_from(sorted(item))))
        elif how == "type":
            kinds = ["item_reference", "web_search_call", "computer_call", "message", "unknown"]
            item["type"] = draw(st.sampled_from(kinds) | junk)
        else:
            item = draw(junk)
        items[index] = item
    return items


def valid_fields(fz: Fuzz) -> dict[str, st.SearchStrategy[Any]]:
    """A valid value for each field of a Responses request the gateway reads (and a few others)."""
    tool = st.builds(
        lambda name, description, strict: {
            "type": "function", "name": name, "description": description,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": strict,
        },
        names, st.none() | texts, st.none() | st.booleans(),
    )
    return {
        "input": texts | input_items(fz.call_ids),
        "instructions": st.none() | texts,
        "previous_response_id": st.none() | st.sampled_from(fz.response_ids),
        "tools": st.lists(tool | mcp_tools, max_size=3),
        "tool_choice": st.sampled_from(["none", "auto", "required"])
        | st.builds(lambda n: {"type": "function", "name": n}, names),
        "parallel_tool_calls": st.booleans(),
        "store": st.booleans(),
        "stream": st.booleans(),
        "background": st.just(False),
        "max_output_tokens": st.integers(1, 2**64 - 1),
        "max_tool_calls": st.integers(1, 10),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "truncation": st.sampled_from(["auto", "disabled"]),
        "include": st.lists(texts, max_size=2),
        "metadata": st.dictionaries(st.text(max_size=64), st.text(max_size=40), max_size=16),
        "reasoning": st.builds(lambda e: {"effort": e}, st.sampled_from(["low", "medium", "high"])),
        "text": st.sampled_from(
            [
                {"format": {"type": "text"}},
                {"format": {"type": "json_object"}},
                {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
            ]
        ),
        "user": texts,
        "safety_identifier": texts,
        "prompt_cache_key": texts,
        "service_tier": st.sampled_from(["auto", "default"]),
        "top_logprobs": st.integers(0, 20),
        "conversation": st.none(),
    }


@st.composite
def responses_bodies(draw: st.DrawFn, fz: Fuzz) -> dict[str, Any]:
    """A Responses request: valid fields, then zero to three of them made wrong or odd."""
    fields = valid_fields(fz)
    body: dict[str, Any] = {"model": MODEL}
    if draw(st.booleans()):
        body["stream"] = True  # streams take another code path: give them a fair share
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=8, unique=True)):
        body[name] = draw(fields[name])
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["model", *sorted(fields), "unknown_field"]))
        how = draw(st.sampled_from(["junk", "junk", "junk", "drop", "drop", "unknown-id"]))
        if how == "junk":
            body[name] = draw(junk)
        elif how == "drop":
            body.pop(name, None)
        else:
            unknown = st.sampled_from(["resp_nope", "", "resp_" + "0" * 40]) | texts
            body["previous_response_id"] = draw(unknown)
    return body


# -- POST /v1/responses -------------------------------------------------------------------------


@fuzzed(500, data=st.data())
def test_structured_responses_bodies(fuzz: Fuzz, data: st.DataObject) -> None:
    body = data.draw(responses_bodies(fuzz))
    reply = post_json(fuzz, "/v1/responses", body)
    streamed = reply.headers["content-type"].startswith("text/event-stream")
    if reply.status_code >= 400:
        event(f"{reply.status_code} param={reply.json()['error']['param']}")
    else:
        event(f"{reply.status_code} streamed={streamed}")
    if reply.status_code == 200 and not streamed:
        assert reply.json()["object"] == "response"


@fuzzed(300, body=json_values)
def test_arbitrary_json_bodies(fuzz: Fuzz, body: Any) -> None:
    assert post_json(fuzz, "/v1/responses", body).status_code in (200, 400)


@fuzzed(
    300,
    value=json_values,
    field=st.sampled_from(["input", "tools", "text", "metadata", "instructions", "tool_choice"]),
)
def test_arbitrary_json_in_one_field(fuzz: Fuzz, value: Any, field: str) -> None:
    post_json(fuzz, "/v1/responses", {"model": MODEL, "input": "hi", field: value})


# Not JSON (orjson refuses them) → 400; JSON but out of range or of the wrong type → 400 too,
# except where the value happens to be valid (-0, 1e-400 = 0.0 are fine temperatures).
NOT_JSON = [b"1e999", b"-1e999", b"NaN", b"Infinity", b"0x10", b"01", b"1.", b".5", b"--1"]
ODD_JSON = [
    b"123456789012345678901234567890", b"18446744073709551616", b"18446744073709551615", b"-0",
    b"1e-400",
]  # fmt: skip
NUMBER_FIELDS = ["max_output_tokens", "temperature", "top_p", "max_tool_calls", "model", "input"]


@pytest.mark.parametrize("number", NOT_JSON + ODD_JSON)
@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_odd_number_literals(fuzz: Fuzz, field: str, number: bytes) -> None:
    sent = b'{"model": "%s", "input": "hi", "%s": %s}' % (MODEL.encode(), field.encode(), number)
    reply = post_raw(fuzz, "/v1/responses", sent)
    if number in NOT_JSON or field in ("model", "input"):
        assert reply.status_code == 400


@fuzzed(150, raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_malformed_bodies(fuzz: Fuzz, raw: bytes) -> None:
    assert post_raw(fuzz, "/v1/responses", raw).status_code == 400


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"model": "m"', id="truncated"),
        pytest.param(b'{"model": "\\ud800", "input": "x"}', id="lone-surrogate"),
        pytest.param(b'\xff\xfe{"model": 1}', id="not-utf8"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b"null", id="null"),
    ],
)
def test_malformed_json_is_a_400(fuzz: Fuzz, raw: bytes) -> None:
    assert post_raw(fuzz, "/v1/responses", raw).status_code == 400


# Where a deeply nested value goes (``@``), in a body for which endpoint.
NESTED_BODIES = {
    "responses-unknown-field": ("/v1/responses", b'{"model": "M", "input": "hi", "junk": @}'),
    "responses-metadata": ("/v1/responses", b'{"model": "M", "input": "hi", "metadata": @}'),
    "responses-tool-parameters": (
        "/v1/responses",
        b'{"model": "M", "input": "hi", '
        b'"tools": [{"type": "function", "name": "f", "parameters": {"a": @}}]}',
    ),
    "responses-input": (
        "/v1/responses", b'{"model": "M", "input": [{"role": "user", "content": @}]}'
    ),
    "chat-messages": (
        "/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": @}]}'
    ),
    "chat-unknown-field": ("/v1/chat/completions", b'{"model": "M", "messages": [], "junk": @}'),
    "tool-parameters": (
        "/v1/tools",
        b'{"name": "deep", "url": "http://127.0.0.1:9/", '
        b'"parameters": {"type": "object", "properties": {"a": @}}}',
    ),
}


@pytest.mark.parametrize("depth", [MAX_DEPTH - 4, MAX_DEPTH + 1, 255, 1000, 1100])
@pytest.mark.parametrize("where", sorted(NESTED_BODIES))
def test_deeply_nested_json(fuzz: Fuzz, depth: int, where: str) -> None:
    """orjson parses up to 1024 levels but writes at most 254: the store must never see more."""
    path, template = NESTED_BODIES[where]
    nested = b"[" * depth + b"]" * depth
    if where == "tool-parameters":
        nested = b'{"items": ' * depth + b"{}" + b"}" * depth
    sent = template.replace(b'"M"', b'"%s"' % MODEL.encode()).replace(b"@", nested)
    reply = post_raw(fuzz, path, sent, ADMIN_HEADERS)
    if depth > MAX_DEPTH:
        assert reply.status_code == 400
    if reply.status_code == 201:
        fuzz.http.delete("/v1/tools/deep", headers=ADMIN_HEADERS)


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions", "/v1/tools"])
def test_oversize_body_is_a_413(fuzz: Fuzz, path: str) -> None:
    big = orjson.dumps({"model": MODEL, "input": "x" * 2_000_000})
    reply = post_raw(fuzz, path, big, ADMIN_HEADERS)
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_oversize_chunked_body_is_a_413(fuzz: Fuzz) -> None:
    """No Content-Length to trust: the limit applies to what arrives."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "%s", "input": "' % MODEL.encode()
        for _ in range(20):
            yield b"x" * 10_000
        yield b'"}'

    reply = fuzz.http.post("/v1/responses", content=chunks(), headers=JSON_HEADERS)
    check(reply)
    assert reply.status_code == 413


def test_function_call_output_for_an_unknown_call_id(fuzz: Fuzz) -> None:
    reply = post_json(
        fuzz,
        "/v1/responses",
        {
            "model": MODEL,
            "previous_response_id": fuzz.response_ids[0],
            "input": [{"type": "function_call_output", "call_id": "call_never", "output": "x"}],
        },
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "input[0].call_id"
    assert "call_never" in reply.json()["error"]["message"]


# PostgreSQL text cannot hold NUL: an id, name or model holding one is never a 5xx there either.
NUL_REQUESTS = {
    "previous-response-id": ("POST", "/v1/responses", {"input": "hi", "previous_response_id": "resp_\x00"}),
    "conversation": ("POST", "/v1/responses", {"input": "hi", "conversation": "conv_\x00"}),
    "item-reference": ("POST", "/v1/responses", {"input": [{"type": "item_reference", "id": "msg_\x00"}]}),
    "input-item-id": ("POST", "/v1/responses", {"input": [{"id": "msg_\x00", "role": "user", "content": "x"}]}),
    "metadata": ("POST", "/v1/responses", {"input": "hi", "metadata": {"k\x00": "v\x00"}}),
    "model": ("POST", "/v1/responses", {"model": "m\x00", "input": "hi"}),
    "compact-model": ("POST", "/v1/responses/compact", {"model": "m\x00", "input": "hi"}),
    "input-tokens-model": ("POST", "/v1/responses/input_tokens", {"model": "m\x00", "input": "hi"}),
    "chat-model": ("POST", "/v1/chat/completions", {"model": "m\x00", "messages": []}),
    "conversation-items": ("POST", "/v1/conversations", {"items": [{"id": "m\x00", "role": "user", "content": "x"}]}),
    "conversation-metadata": ("POST", "/v1/conversations", {"metadata": {"k\x00": "v\x00"}}),
    "get-conversation": ("GET", "/v1/conversations/conv_%00", None),
    "tool-name": ("POST", "/v1/tools", {"name": "t\x00", "url": "http://127.0.0.1:9/x"}),
    "get-tool": ("GET", "/v1/tools/t%00", None),
    "input-items-after": ("GET", "/v1/responses/{id}/input_items?after=%00", None),
}


@pytest.mark.parametrize("case", sorted(NUL_REQUESTS))
def test_a_nul_in_an_id_name_or_model_is_never_a_5xx(fuzz: Fuzz, case: str) -> None:
    method, path, body = NUL_REQUESTS[case]
    path = path.replace("{id}", fuzz.response_ids[0])
    if body is None:
        reply = fuzz.http.request(method, path, headers=ADMIN_HEADERS)
        check(reply)
    else:
        body = body if path.startswith(("/v1/tools", "/v1/conversations")) else {"model": MODEL, **body}
        reply = post_json(fuzz, path, body, ADMIN_HEADERS)
    if "metadata" in case:
        assert reply.status_code == 200, reply.text
    else:
        assert 400 <= reply.status_code < 500, reply.text


# -- POST /v1/chat/completions ------------------------------------------------------------------

chat_roles = st.sampled_from(["user", "assistant", "system", "tool"])
chat_messages = st.lists(
    st.fixed_dictionaries({"role": chat_roles | junk, "content": texts | junk}) | junk, max_size=4
)
chat_bodies = st.fixed_dictionaries(
    # Mostly a usable model and message list, so that most bodies reach the upstream.
    {
        "model": st.just(MODEL) | st.just(MODEL) | junk,
        "messages": chat_messages | chat_messages | junk,
    },
    optional={
        "stream": st.booleans() | junk,
        "temperature": junk,
        "max_tokens": junk,
        "tools": junk,
        "stream_options": st.just({"include_usage": True}) | junk,
    },
)


@fuzzed(250, body=chat_bodies | chat_bodies | json_values)
def test_chat_completions_bodies(fuzz: Fuzz, body: Any) -> None:
    reply = post_json(fuzz, "/v1/chat/completions", body)
    param = reply.json()["error"]["param"] if reply.status_code >= 400 else None
    event(f"{reply.status_code} param={param}")


# -- GET/DELETE /v1/responses/{id}, input_items, steps ------------------------------------------

printable_ids = st.text(alphabet=string.printable, max_size=30)
query_params = st.dictionaries(
    st.sampled_from(["after", "limit", "order", "include", "stream", "starting_after"]) | texts,
    st.sampled_from(
        ["asc", "desc", "0", "1", "100", "101", "-1", "2.5", "", "true", "1e3", "9" * 20]
    )
    | texts,
    max_size=4,
)


@fuzzed(
    300, data=st.data(), params=query_params, what=st.sampled_from(["", "/input_items", "/steps"])
)
def test_get_response_paths(
    fuzz: Fuzz, data: st.DataObject, params: dict[str, str], what: str
) -> None:
    response_id = data.draw(st.sampled_from(fuzz.response_ids) | texts | printable_ids)
    reply = fuzz.http.get(f"/v1/responses/{quote(response_id, safe='')}{what}", params=params)
    check(reply)
    if response_id not in fuzz.response_ids:
        assert reply.status_code >= 400


@fuzzed(150, response_id=texts | printable_ids)
def test_delete_unknown_responses(fuzz: Fuzz, response_id: str) -> None:
    if response_id in fuzz.response_ids:
        return
    reply = fuzz.http.delete(f"/v1/responses/{quote(response_id, safe='')}")
    check(reply)
    assert reply.status_code in (404, 405)


# -- POST /v1/tools -----------------------------------------------------------------------------

tool_bodies = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["fuzz_tool", "fuzz-2"]) | junk,
        "description": texts | junk,
        "parameters": st.just({"type": "object", "properties": {}}) | junk,
        "kind": st.sampled_from(["http", "agent"]) | junk,
        "attach": st.sampled_from(["always", "on_request"]) | junk,
        # Only loopback, and port 9 (discard) where nothing listens: a registered tool is harmless.
        "url": st.sampled_from(
            ["http://127.0.0.1:9/x", "ftp://127.0.0.1:9/", "http://u:p@127.0.0.1:9/", "http://[::1"]
        )
        | junk,
        "headers": st.dictionaries(texts, texts | junk, max_size=2) | junk,
        "timeout_s": st.floats(0.1, 600) | junk,
        "idempotent": st.booleans() | junk,
        "model": st.just(MODEL) | junk,
        "instructions": texts | junk,
        "tools": st.lists(names, max_size=2) | junk,
        "object": st.just("tool") | junk,
    },
)


@fuzzed(250, body=tool_bodies | json_values, authorized=st.booleans())
def test_tool_registration_bodies(fuzz: Fuzz, body: Any, authorized: bool) -> None:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"} if authorized else {}
    reply = post_json(fuzz, "/v1/tools", body, headers)
    if not authorized:
        assert reply.status_code == 401
    if reply.status_code == 201:
        # Never leave a tool behind for the other fuzz tests' model to call.
        name = reply.json()["name"]
        deleted = fuzz.http.delete(f"/v1/tools/{name}", headers=headers)
        assert deleted.status_code == 200, deleted.text
