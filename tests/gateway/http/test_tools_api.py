"""The tool admin API over real HTTP: httpx against uvicorn, tools in a real SQLite file and in a
real PostgreSQL database (every test runs on both)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.config import Settings
from gateway.http.app import create_app
from gateway.testing.serving import serve_app
from store import open_store

SECRET = "sk-live-weather-5f2a9c"
ADMIN_KEY = "admin-key-7d41"
WEATHER = {
    "name": "weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "kind": "http",
    "url": "https://weather.example/v1/current",
    "headers": {"Authorization": f"Bearer {SECRET}", "X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY"},
    "timeout_s": 10,
    "attach": "on_request",
}


def tools_app(db: str, admin_key: str | None) -> Starlette:
    """The whole gateway app on ``db`` (no upstream needed: only the tool routes are called)."""
    return create_app(Settings(db=str(db), admin_key=admin_key))


@contextlib.contextmanager
def admin_client(
    db: str, admin_key: str | None = None, bodies: list[bytes] | None = None, **headers: str
) -> Iterator[httpx.Client]:
    """A client of a fresh app on ``db``; every response body is appended to ``bodies``."""

    def keep(response: httpx.Response) -> None:
        response.read()
        if bodies is not None:
            bodies.append(response.content)

    with serve_app(tools_app(db, admin_key)) as url:
        with httpx.Client(
            base_url=url, headers=headers, timeout=30, event_hooks={"response": [keep]}
        ) as client:
            yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def db(db_url: str) -> str:
    """A fresh database: an SQLite file, then a PostgreSQL database."""
    return db_url


def test_crud_and_secrets_never_returned(db: str) -> None:
    bodies: list[bytes] = []
    with admin_client(db, bodies=bodies) as client:
        created = client.post("/v1/tools", json=WEATHER)
        assert created.status_code == 201
        tool = created.json()
        assert tool["object"] == "tool"
        assert tool["headers"] == {"Authorization": "***", "X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY"}
        assert {k: v for k, v in tool.items() if k not in ("object", "headers")} == {
            **{k: v for k, v in WEATHER.items() if k != "headers"},
            "idempotent": False,
            "allow_private": False,
            "require_approval": "never",
        }

        duplicate = client.post("/v1/tools", json=WEATHER)
        assert duplicate.status_code == 409
        assert error_of(duplicate)["param"] == "name"
        assert "already exists" in error_of(duplicate)["message"]

        client.post("/v1/tools", json={"name": "agent_x", "kind": "agent", "model": "m"})
        listed = client.get("/v1/tools")
        assert listed.status_code == 200
        assert listed.json()["object"] == "list"
        assert [t["name"] for t in listed.json()["data"]] == ["agent_x", "weather"]

        assert client.get("/v1/tools/weather").json() == tool

        # PUT the GET body back with a change: the hidden value is kept, not replaced by "***".
        edited = {**tool, "description": "Edited."}
        replaced = client.put("/v1/tools/weather", json=edited)
        assert replaced.status_code == 200
        assert replaced.json() == edited

        deleted = client.delete("/v1/tools/agent_x")
        assert deleted.status_code == 200
        assert deleted.json() == {"name": "agent_x", "object": "tool", "deleted": True}
        assert client.get("/v1/tools/agent_x").status_code == 404

    assert len(bodies) == 8
    assert not any(SECRET.encode() in body for body in bodies)

    # Persisted: a new app on the same database still has the tool, secret included (not "***").
    with admin_client(db) as client:
        assert client.get("/v1/tools/weather").json()["description"] == "Edited."

    async def stored() -> dict[str, Any] | None:
        store = open_store(db)
        await store.open()
        try:
            return await store.get_tool("weather")
        finally:
            await store.close()

    assert asyncio.run(stored())["headers"]["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("GET", "/v1/tools/nope", id="get"),
        pytest.param("DELETE", "/v1/tools/nope", id="delete"),
        pytest.param("PUT", "/v1/tools/nope", id="put"),
    ],
)
def test_unknown_tool_is_404(db: str, method: str, path: str) -> None:
    with admin_client(db) as client:
        response = client.request(method, path, json={"url": "http://h/"})
    assert response.status_code == 404
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", "name")
    assert "'nope'" in error["message"]


@pytest.mark.parametrize(
    "body, param, needle",
    [
        pytest.param({**WEATHER, "name": "bad name"}, "name", "1 to 64", id="name"),
        pytest.param({**WEATHER, "parameters": {"type": "nope"}}, "parameters", "JSON Schema", id="schema"),
        pytest.param({**WEATHER, "extra": 1}, "extra", "Unknown field 'extra'", id="unknown-key"),
        pytest.param({**WEATHER, "headers": {"X": 1}}, "headers.X", "string", id="header"),
        pytest.param([WEATHER], None, "JSON object", id="array"),
    ],
)
def test_bad_registration_is_400_naming_the_field(
    db: str, body: Any, param: str, needle: str
) -> None:
    bodies: list[bytes] = []
    with admin_client(db, bodies=bodies) as client:
        response = client.post("/v1/tools", json=body)
        assert client.get("/v1/tools").json()["data"] == []
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param
    assert needle in error["message"]
    assert not any(SECRET.encode() in b for b in bodies)


def test_malformed_json_is_400(db: str) -> None:
    with admin_client(db) as client:
        response = client.post(
            "/v1/tools", content=b'{"name": ', headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert "not valid JSON" in error_of(response)["message"]


def test_put_name_mismatch_is_400(db: str) -> None:
    with admin_client(db) as client:
        client.post("/v1/tools", json=WEATHER)
        response = client.put("/v1/tools/weather", json={**WEATHER, "name": "other"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "name"


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Bearer wrong-key", id="wrong"),
        pytest.param(f"Basic {ADMIN_KEY}", id="wrong-scheme"),
        pytest.param(f"Bearer {ADMIN_KEY}x", id="longer"),
        pytest.param("Bearer", id="empty"),
    ],
)
def test_admin_key_required_when_set(db: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    with admin_client(db, admin_key=ADMIN_KEY, **headers) as client:
        responses = [
            client.post("/v1/tools", json=WEATHER),
            client.get("/v1/tools"),
            client.get("/v1/tools/weather"),
            client.put("/v1/tools/weather", json=WEATHER),
            client.delete("/v1/tools/weather"),
        ]
    for response in responses:
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_api_key"
        assert ADMIN_KEY not in response.text


def test_admin_key_accepted(db: str) -> None:
    with admin_client(db, admin_key=ADMIN_KEY, authorization=f"Bearer {ADMIN_KEY}") as client:
        assert client.post("/v1/tools", json=WEATHER).status_code == 201
        assert client.get("/v1/tools").json()["data"][0]["name"] == "weather"
        assert client.delete("/v1/tools/weather").status_code == 200
