"""The trace viewer's JSON: ``GET /v1/stepchain/responses`` (tenants, admin, filters, paging) and
the admin key's read access to stored responses, on a real gateway with two tenant keys (on
SQLite, then on PostgreSQL)."""

from __future__ import annotations

import httpx
import pytest

from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway

MODEL = "scripted-model"
KEY_A, KEY_B, ADMIN = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-admin-key-4242"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, module_db):
    tmp = tmp_path_factory.mktemp("ui-api")
    with running_gateway(tmp, db=module_db, api_keys=f"{KEY_A},{KEY_B}", admin_key=ADMIN) as running:
        running.ids = []
        with running.http() as http:
            for text in ("one", "two", "three"):
                running.model.replies.append(Reply(content=f"answer {text}"))
                reply = http.post("/v1/responses", json={"model": MODEL, "input": text},
                                  headers=bearer(KEY_A))
                assert reply.status_code == 200, reply.text
                running.ids.append(reply.json()["id"])
            running.model.replies.append(Reply(status=400))
            failed = http.post("/v1/responses", json={"model": MODEL, "input": "bad"},
                               headers=bearer(KEY_B))
            assert failed.status_code >= 400
        yield running


def test_a_tenant_lists_its_own_responses_newest_first_with_their_totals(gw):
    with gw.http() as http:
        page = http.get("/v1/stepchain/responses", headers=bearer(KEY_A)).json()
    assert page["object"] == "list" and page["admin"] is False and page["has_more"] is False
    assert [r["id"] for r in page["data"]] == gw.ids[::-1]
    row = page["data"][0]
    assert row["status"] == "completed" and row["model"] == MODEL
    assert row["steps"] == 1 and row["model_calls"] == 1 and row["tool_calls"] == 0
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert row["total_tokens"] == row["input_tokens"] + row["output_tokens"]
    assert row["duration_s"] is not None and row["duration_s"] >= 0
    assert row["cost_usd"] is None  # no price configured: unknown, not 0
    assert "tenant" not in row


def test_pages_follow_each_other_through_after(gw):
    seen = []
    after = None
    with gw.http() as http:
        while True:
            params = {"limit": "2", **({"after": after} if after else {})}
            page = http.get("/v1/stepchain/responses", params=params, headers=bearer(KEY_A)).json()
            seen += [r["id"] for r in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
    assert seen == gw.ids[::-1]


def test_filters_by_status_model_and_id(gw):
    with gw.http() as http:
        def ids(key, **params):
            reply = http.get("/v1/stepchain/responses", params=params, headers=bearer(key))
            assert reply.status_code == 200, reply.text
            return [r["id"] for r in reply.json()["data"]]

        assert ids(KEY_A, status="failed") == []
        assert len(ids(KEY_B, status="failed")) == 1
        assert ids(KEY_A, model="other-model") == []
        assert ids(KEY_A, q=gw.ids[1][-10:]) == [gw.ids[1]]


def test_the_admin_sees_every_tenant_and_reads_any_response_but_cannot_create(gw):
    with gw.http() as http:
        page = http.get("/v1/stepchain/responses", headers=bearer(ADMIN)).json()
        assert page["admin"] is True
        tenants = {r["tenant"] for r in page["data"]}
        assert len(tenants) == 2 and all(t.startswith("tenant_") for t in tenants)
        assert http.get(f"/v1/responses/{gw.ids[0]}", headers=bearer(ADMIN)).status_code == 200
        assert http.get(f"/v1/responses/{gw.ids[0]}/steps", headers=bearer(ADMIN)).status_code == 200
        # Reads only: the admin key is no tenant, it creates and deletes nothing here.
        create = http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=bearer(ADMIN))
        assert create.status_code == 401
        delete = http.delete(f"/v1/responses/{gw.ids[0]}", headers=bearer(ADMIN))
        assert delete.status_code == 401
        # Another tenant sees nothing of A's.
        assert http.get(f"/v1/responses/{gw.ids[0]}", headers=bearer(KEY_B)).status_code == 404


@pytest.mark.parametrize(
    "params, param",
    [
        pytest.param({"status": "done"}, "status", id="unknown-status"),
        pytest.param({"limit": "0"}, "limit", id="limit-zero"),
        pytest.param({"limit": "abc"}, "limit", id="limit-text"),
        pytest.param({"after": "resp_nope"}, "after", id="unknown-after"),
    ],
)
def test_bad_listing_parameters_are_400s(gw, params, param):
    with gw.http() as http:
        reply = http.get("/v1/stepchain/responses", params=params, headers=bearer(KEY_A))
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_without_a_key_the_listing_is_401(gw):
    with httpx.Client(base_url=gw.url) as http:
        assert http.get("/v1/stepchain/responses").status_code == 401
        page = http.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert http.get("/ui/static/app.css").status_code == 200
