"""``POST /v1/responses`` is served in front of the Starlette stack (gateway.http.hot): the same
answers, errors, authentication and metrics as every other route, and every other request still
goes through the stack. Real gateways on uvicorn, real HTTP."""

from __future__ import annotations

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway

MODEL = "scripted-model"
KEY = "sk-hot-route-0123456789"


def _samples(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _count(samples: dict, route: str, status: str, method: str = "POST") -> float:
    labels = tuple(sorted({"route": route, "method": method, "status": status}.items()))
    return samples.get(("stepchain_http_request_duration_seconds_count", labels), 0.0)


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.content)
    body = orjson.loads(reply.content)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_open_gateway_answers_errors_and_counts_like_the_stack(tmp_path):
    with running_gateway(tmp_path) as gw, gw.http() as http:
        gw.model.replies.extend([Reply(content="Hello."), Reply(content="Streamed.")])
        before = _samples(http)

        reply = http.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        assert int(reply.headers["content-length"]) == len(reply.content)
        created = reply.json()
        assert created["status"] == "completed" and created["output"][0]["content"][0]["text"] == "Hello."
        # Stored as answered: GET (through the stack) returns the same object.
        assert http.get(f"/v1/responses/{created['id']}").json() == created

        bad_json = _error(http.post("/v1/responses", content=b"{not json"), 400)
        assert bad_json["type"] == "invalid_request_error"
        assert _error(http.post("/v1/responses", json={"input": "no model"}), 400)["param"] == "model"
        assert _error(http.post("/v1/responses", json=[1, 2]), 400)["type"] == "invalid_request_error"

        # Not the hot route: the router's answers, unchanged.
        assert _error(http.get("/v1/responses"), 405)["type"] == "invalid_request_error"
        assert _error(http.post("/v1/responses/", json={"model": MODEL, "input": "Hi"}), 404)

        # A streamed response through the same route: SSE, counted while it is sent.
        with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True}) as sse:
            assert sse.status_code == 200
            assert sse.headers["content-type"].startswith("text/event-stream")
            text = "".join(sse.iter_text())
        assert "event: response.completed" in text and text.rstrip().endswith("data: [DONE]")

        after = _samples(http)
    assert _count(after, "/v1/responses", "200") - _count(before, "/v1/responses", "200") == 2
    assert _count(after, "/v1/responses", "400") - _count(before, "/v1/responses", "400") == 3
    assert _count(after, "/v1/responses", "405", "GET") - _count(before, "/v1/responses", "405", "GET") == 1
    assert after[("stepchain_live_streams", ())] == before.get(("stepchain_live_streams", ()), 0.0)


def test_keyed_gateway_refuses_and_admits_like_the_middleware(tmp_path):
    with running_gateway(tmp_path, api_keys=KEY) as gw, gw.http() as http:
        gw.model.replies.append(Reply(content="Hello, tenant."))
        before = _samples(http)

        missing = http.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
        assert _error(missing, 401)["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "didn't provide an API key" in missing.json()["error"]["message"]
        wrong = http.post(
            "/v1/responses", json={"model": MODEL, "input": "Hi"},
            headers={"Authorization": "Bearer sk-wrong"},
        )
        assert _error(wrong, 401)["message"] == "Incorrect API key provided."

        auth = {"Authorization": f"Bearer {KEY}"}
        reply = http.post("/v1/responses", json={"model": MODEL, "input": "Hi"}, headers=auth)
        assert reply.status_code == 200, reply.text
        response_id = reply.json()["id"]
        # The tenant the key maps to owns it: readable with the key, not without.
        assert http.get(f"/v1/responses/{response_id}", headers=auth).status_code == 200
        assert http.get(f"/v1/responses/{response_id}").status_code == 401

        after = _samples(http)
    # Refused before the router: counted under "unmatched", as the stack's middleware did.
    assert _count(after, "unmatched", "401") - _count(before, "unmatched", "401") == 2
    assert _count(after, "/v1/responses", "200") - _count(before, "/v1/responses", "200") == 1
