"""One exception tree and one boundary: every exception class of store/, executors/ and gateway/
is a GatewayError or translated; the same upstream failure is the same HTTP error on every
endpoint; a store failure reaching a route is a 503."""

from __future__ import annotations

import importlib
import pkgutil
import sqlite3

import click
import httpx
import openai
import pytest

from executors.egress import EgressError
from executors.http_tool import ToolError
from executors.reassembly import StreamCutError
from executors.registry import ToolDefinitionError
from executors.upstream import UpstreamError as UpstreamCallError
from gateway.errors import (
    ConfigError,
    ConflictError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    StoreUnavailableError,
    UpstreamError,
    is_translated,
    to_gateway_error,
)
from gateway.testing.scripted_upstream import Reply
from store.types import StepStateError, StoreConflictError, StoreError, StoreNotFoundError
from tests.gateway.harness import running_gateway

PACKAGES = ("store", "executors", "gateway")


def _our_exception_classes() -> list[type[BaseException]]:
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            importlib.import_module(info.name)
    found: list[type[BaseException]] = []
    pending = [BaseException]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            pending.append(sub)
            if sub.__module__.split(".")[0] in PACKAGES and sub not in found:
                found.append(sub)
    return found


def test_every_exception_class_is_in_the_tree_or_translated():
    classes = _our_exception_classes()
    assert {StoreError, UpstreamCallError, ToolError, ConfigError} <= set(classes)
    # Command-line errors (click's) are shown by click on stderr and never reach a client.
    served = [c for c in classes if not issubclass(c, click.ClickException)]
    unmapped = [f"{c.__module__}.{c.__qualname__}" for c in served if not is_translated(c)]
    assert not unmapped, f"add these to gateway.errors._translations: {unmapped}"


@pytest.mark.parametrize(
    ("exc", "kind", "status", "error_type", "code"),
    [
        pytest.param(StoreNotFoundError("response 'r' not found"), NotFoundError, 404, "invalid_request_error", None, id="store-not-found"),
        pytest.param(StoreConflictError("already exists"), ConflictError, 409, "invalid_request_error", None, id="store-conflict"),
        pytest.param(StepStateError("completed → processing"), ConflictError, 409, "invalid_request_error", None, id="step-state"),
        pytest.param(StoreError("disk I/O error"), StoreUnavailableError, 503, "server_error", "store_unavailable", id="store"),
        pytest.param(UpstreamCallError("bad model", status=400, body={"error": {"param": "model", "code": "model_not_found"}}),
                     InvalidRequestError, 400, "invalid_request_error", "model_not_found", id="upstream-400"),
        pytest.param(UpstreamCallError("no such thing", status=404), InvalidRequestError, 404, "invalid_request_error", None, id="upstream-404"),
        pytest.param(UpstreamCallError("slow down", type="rate_limited", status=429), RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded", id="upstream-429"),
        pytest.param(UpstreamCallError("quota", type="insufficient_quota", status=429), RateLimitError, 429, "rate_limit_error", "insufficient_quota", id="upstream-quota"),
        pytest.param(UpstreamCallError("HTTP 503", status=503), UpstreamError, 502, "upstream_error", "upstream_error", id="upstream-503"),
        pytest.param(UpstreamCallError("refused", type="upstream_connection_error"), UpstreamError, 502, "upstream_error", "upstream_connection_error", id="upstream-connection"),
        pytest.param(UpstreamCallError("read 10 s", type="upstream_timeout"), UpstreamError, 502, "upstream_error", "upstream_timeout", id="upstream-timeout"),
        pytest.param(StreamCutError("ended early"), UpstreamError, 502, "upstream_error", "upstream_error", id="stream-cut"),
        pytest.param(ToolError("http_error", "tool said 500", 500), UpstreamError, 502, "upstream_error", "http_error", id="tool"),
        pytest.param(ToolDefinitionError("url is required", "url"), InvalidRequestError, 400, "invalid_request_error", None, id="tool-definition"),
        pytest.param(EgressError("169.254.169.254 is a link-local address"), InvalidRequestError, 400,
                     "invalid_request_error", "url_not_allowed", id="egress"),
        pytest.param(KeyError("a bug"), GatewayError, 500, "server_error", None, id="unmapped"),
    ],
)
def test_translation_at_the_boundary(exc, kind, status, error_type, code):
    error = to_gateway_error(exc)
    assert type(error) is kind
    assert error.__cause__ is exc
    body = error.to_dict()["error"]
    assert (error.status_code, body["type"], body["code"]) == (status, error_type, code)
    if kind is GatewayError:
        assert "a bug" not in body["message"]  # nothing of an unexpected error is revealed


def test_store_errors_do_not_reveal_their_details():
    body = to_gateway_error(StoreError("sqlite error: disk I/O error at /var/lib/x.db")).to_dict()
    assert "/var/lib" not in body["error"]["message"]


# -- the same upstream failure on every endpoint ---------------------------------------------


def _call_each_endpoint(gw) -> dict[str, httpx.Response]:
    replies = {}
    with gw.http() as http:
        for name, path, body in [
            ("responses", "/v1/responses", {"model": "m", "input": "x"}),
            ("responses-stream", "/v1/responses", {"model": "m", "input": "x", "stream": True}),
            ("chat", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            ("chat-stream", "/v1/chat/completions",
             {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}),
        ]:
            replies[name] = http.post(path, json=body)
    return replies


@pytest.mark.parametrize(
    ("reply", "status", "error_type", "code", "message"),
    [
        pytest.param(Reply(status=400, error_code="context_length_exceeded"), 400, "invalid_request_error",
                     "context_length_exceeded", "HTTP 400", id="400"),
        pytest.param(Reply(status=422), 422, "invalid_request_error", None, "HTTP 422", id="422"),
        pytest.param(Reply(status=429, error_code="insufficient_quota"), 429, "rate_limit_error",
                     "insufficient_quota", "quota", id="quota"),
        pytest.param(Reply(status=503), 502, "upstream_error", "upstream_error", "503", id="503"),
    ],
)
def test_one_rule_for_an_upstream_failure_on_every_endpoint(tmp_path, reply, status, error_type, code, message):
    with running_gateway(tmp_path, upstream_max_retries=0) as gw:
        gw.model.replies.extend([reply] * 4)
        replies = _call_each_endpoint(gw)
    for endpoint, response in replies.items():
        assert response.status_code == status, (endpoint, response.text)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == (error_type, code), endpoint
        assert message in error["message"], (endpoint, error["message"])


def test_the_sdk_sees_the_upstreams_400_as_a_bad_request(tmp_path):
    with running_gateway(tmp_path, upstream_max_retries=0) as gw, gw.client() as client:
        gw.model.replies.extend([Reply(status=400)] * 2)
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="m", input="x")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_a_store_failure_reaching_a_route_is_a_503(tmp_path):
    """With the database's write lock held elsewhere past SQLite's busy timeout, a DELETE
    fails in the store: the client gets a 503 it may retry, not a 500. (SQLite only: it holds
    SQLite's lock; on PostgreSQL, engine/test_durability.py stops the server for the same 503.)"""
    with running_gateway(tmp_path) as gw, gw.client() as client, gw.http() as http:
        gw.model.replies.append(Reply(content="kept"))
        response = client.responses.create(model="m", input="x")
        locker = sqlite3.connect(gw.db, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # no one else can write now
            deleted = http.delete(f"/v1/responses/{response.id}")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert deleted.status_code == 503, deleted.text
        error = deleted.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "store_unavailable")
        assert http.get(f"/v1/responses/{response.id}").status_code == 200  # nothing was lost
