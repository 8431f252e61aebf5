"""API keys and tenants: two tenants through the real openai SDK, the admin key, keys files (on
SQLite and PostgreSQL), and the middleware on its own in front of a small app that shows what it
put in the scope."""

from __future__ import annotations

import hashlib

import httpx
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gateway.config import ConfigError, Settings
from gateway.http.app import create_app
from gateway.http.auth import AuthMiddleware, load_api_keys
from gateway.testing.scripted_upstream import Reply
from tests.gateway.harness import running_gateway
from tests.servers import serve_app, serve_scripted_upstream

MODEL = "scripted-model"
KEY_A, KEY_B, ADMIN = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-admin-key"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def invalid_key_body(reply: httpx.Response) -> dict:
    assert reply.status_code == 401
    assert reply.headers["content-type"] == "application/json"
    body = orjson.loads(reply.content)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    return body["error"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory, module_db):
    tmp = tmp_path_factory.mktemp("tenants")
    with running_gateway(tmp, db=module_db, api_keys=f"{KEY_A}, {KEY_B}", admin_key=ADMIN) as running:
        yield running


def sdk(gw, key: str) -> openai.OpenAI:
    """An SDK client with ``key``, closed when ``gw`` stops."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    gw.clients.callback(client.close)
    return client


# -- two tenants ---------------------------------------------------------------------------------


def test_a_tenant_cannot_see_another_tenants_response(gw):
    a, b = sdk(gw, KEY_A), sdk(gw, KEY_B)
    gw.model.replies.append(Reply(content="for A only"))
    response = a.responses.create(model=MODEL, input=[{"role": "user", "content": "secret of A"}])
    assert response.output_text == "for A only"

    # A reads everything of its own.
    assert a.responses.retrieve(response.id).output_text == "for A only"
    assert [i.content[0].text for i in a.responses.input_items.list(response.id)] == ["secret of A"]
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEY_A}"}) as http:
        steps = http.get(f"/v1/responses/{response.id}/steps")
        assert steps.status_code == 200 and len(steps.json()["data"]) == 1

    # B gets a 404 (not 403: whether the id exists is A's business) everywhere.
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.input_items.list(response.id)
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEY_B}"}) as http:
        steps = http.get(f"/v1/responses/{response.id}/steps")
        assert steps.status_code == 404
        assert "secret" not in steps.text
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(response.id)
    with pytest.raises(openai.BadRequestError) as info:
        b.responses.create(model=MODEL, input="and then?", previous_response_id=response.id)
    assert info.value.body["code"] == "previous_response_not_found"
    assert info.value.body["param"] == "previous_response_id"

    # B's failed delete deleted nothing; A can still continue its own conversation.
    gw.model.replies.append(Reply(content="still here"))
    follow_up = a.responses.create(model=MODEL, input="and then?", previous_response_id=response.id)
    assert follow_up.output_text == "still here"
    assert gw.model.requests[-1]["messages"][0] == {"role": "user", "content": "secret of A"}


def test_each_key_is_its_own_tenant_for_its_own_responses(gw):
    for key in (KEY_A, KEY_B):
        client = sdk(gw, key)
        gw.model.replies.append(Reply(content=f"hello {key[-4:]}"))
        response = client.responses.create(model=MODEL, input="hi")
        assert client.responses.retrieve(response.id).output_text == f"hello {key[-4:]}"


# -- missing, wrong and odd keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [pytest.param("sk-wrong", id="unknown"), pytest.param(ADMIN, id="admin-key-is-no-tenant")]
)
def test_a_wrong_key_is_a_401_through_the_sdk(gw, key):
    upstream_calls = len(gw.model.requests)
    client = sdk(gw, key)
    with pytest.raises(openai.AuthenticationError) as info:
        client.responses.create(model=MODEL, input="hi")
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert len(gw.model.requests) == upstream_calls  # nothing reached the upstream


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"authorization": ""}, id="empty"),
        pytest.param({"authorization": "Bearer"}, id="bearer-no-key"),
        pytest.param({"authorization": f"Basic {KEY_A}"}, id="basic-scheme"),
        pytest.param({"authorization": f"Bearer {KEY_A}x"}, id="key-plus-one"),
        pytest.param({"authorization": f"Bearer {KEY_A[:-1]}"}, id="key-minus-one"),
        pytest.param({"x-api-key": KEY_A}, id="other-header"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_123"),
        ("GET", "/v1/responses/resp_123/input_items"),
        ("GET", "/v1/responses/resp_123/steps"),
        ("DELETE", "/v1/responses/resp_123"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/no-such-route"),
    ],
)
def test_every_v1_route_needs_a_known_key(gw, headers, method, path):
    with httpx.Client(base_url=gw.url) as http:
        reply = http.request(method, path, headers=headers, json={"model": MODEL, "input": "x"})
    error = invalid_key_body(reply)
    assert KEY_A not in error["message"]


def test_bearer_scheme_is_case_insensitive_and_trimmed(gw):
    gw.model.replies.append(Reply(content="ok"))
    with httpx.Client(base_url=gw.url) as http:
        reply = http.post(
            "/v1/responses",
            headers={"authorization": f"bEaReR  {KEY_B}"},
            json={"model": MODEL, "input": "x"},
        )
    assert reply.status_code == 200, reply.text


def test_healthz_is_open(gw):
    with httpx.Client(base_url=gw.url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/healthz", headers={"authorization": "Bearer nope"}).status_code == 200


# -- the tool admin API keeps the admin key ---------------------------------------------------------


def test_tools_use_the_admin_key_only(gw):
    tool = {"name": "lookup", "url": "http://127.0.0.1:9/lookup", "attach": "on_request"}
    with httpx.Client(base_url=gw.url) as http:
        for key in (None, KEY_A, KEY_B, "sk-wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            assert http.post("/v1/tools", json=tool, headers=headers).status_code == 401
            assert http.get("/v1/tools", headers=headers).status_code == 401
        admin = {"authorization": f"Bearer {ADMIN}"}
        assert http.post("/v1/tools", json=tool, headers=admin).status_code == 201
        assert [t["name"] for t in http.get("/v1/tools", headers=admin).json()["data"]] == ["lookup"]
        assert http.delete("/v1/tools/lookup", headers=admin).status_code == 200


@pytest.mark.usefixtures("on_both_backends")
def test_tools_stay_closed_on_a_keyed_gateway_without_an_admin_key(tmp_path):
    """Tenant keys but no admin key: nobody may register a tool (an ``attach: always`` tool
    would be offered to, and called for, every tenant)."""
    tool = {"name": "sneaky", "url": "http://127.0.0.1:9/exfiltrate"}
    replies = []
    with running_gateway(tmp_path, api_keys=KEY_A) as gw, httpx.Client(base_url=gw.url) as http:
        for headers in ({}, {"authorization": f"Bearer {KEY_A}"}):
            replies.append(http.post("/v1/tools", json=tool, headers=headers))
            replies.append(http.get("/v1/tools", headers=headers))
    for reply in replies:
        assert reply.status_code in (401, 403), reply.text
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


# -- keys files ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("on_both_backends")
def test_keys_from_a_file(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# tenants\n\n  {KEY_A}  \n#{KEY_B}\n")
    with running_gateway(tmp_path, api_keys_file=str(keys_file)) as gw:
        gw.model.replies.append(Reply(content="from file"))
        assert sdk(gw, KEY_A).responses.create(model=MODEL, input="x").output_text == "from file"
        with pytest.raises(openai.AuthenticationError):
            sdk(gw, KEY_B).responses.create(model=MODEL, input="x")  # commented out
        with pytest.raises(openai.AuthenticationError):
            sdk(gw, f"#{KEY_B}").responses.create(model=MODEL, input="x")


def test_load_api_keys(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("k3\n# k4\n\nk2\n")
    hashes = load_api_keys(" k1 ,k2,, ", str(keys_file))
    assert hashes == {sha(k): "tenant_" + sha(k)[:16] for k in ("k1", "k2", "k3")}
    assert load_api_keys(None, None) == {} == load_api_keys("", None) == load_api_keys(" , ", None)
    # The same key always maps to the same tenant (replicas, restarts).
    assert load_api_keys("k1", None) == load_api_keys("k1", None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "cannot read", id="missing"),
        pytest.param(b"# only comments\n\n", "holds no key", id="no-keys"),
        pytest.param(b"\xff\xfe\x00k", "not UTF-8", id="not-text"),
    ],
)
def test_bad_keys_files_are_config_errors(tmp_path, content, message):
    keys_file = tmp_path / "keys"
    if content is not None:
        keys_file.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_api_keys("k1", str(keys_file))
    assert message in str(info.value) and "api_keys_file" in str(info.value)


# -- the middleware on its own -------------------------------------------------------------------


async def show_scope(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "tenant": request.scope.get("stepchain.tenant", "<unset>"),
            "client_key": request.scope.get("stepchain.client_key", "<unset>"),
        }
    )


async def show_scope_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(str(websocket.scope.get("stepchain.tenant")))
    await websocket.close()


def scope_app(key_hashes: dict[str, str], *, pass_client_key: bool = False) -> Starlette:
    paths = ("/v1/echo", "/v1/tools", "/v1/tools/x", "/healthz")
    routes = [*(Route(path, show_scope) for path in paths), WebSocketRoute("/v1/ws", show_scope_ws)]
    middleware = [Middleware(AuthMiddleware, key_hashes=key_hashes, pass_client_key=pass_client_key)]
    return Starlette(routes=routes, middleware=middleware)


@pytest.mark.parametrize("pass_client_key", [False, True])
def test_middleware_sets_tenant_and_client_key(pass_client_key):
    hashes = load_api_keys(KEY_A, None)
    with serve_app(scope_app(hashes, pass_client_key=pass_client_key)) as url:
        with httpx.Client(base_url=url) as http:
            seen = http.get("/v1/echo", headers={"authorization": f"Bearer {KEY_A}"}).json()
            assert seen["tenant"] == "tenant_" + sha(KEY_A)[:16]
            assert seen["client_key"] == (KEY_A if pass_client_key else "<unset>")
            # Open paths run without a tenant; /v1/tools is left to the admin-key check.
            assert http.get("/healthz").json()["tenant"] == "<unset>"
            assert http.get("/v1/tools").json()["tenant"] == "<unset>"
            assert http.get("/v1/tools/x").json()["client_key"] == "<unset>"
            invalid_key_body(http.get("/v1/echo"))


@pytest.mark.parametrize("pass_client_key", [False, True])
def test_an_open_gateway_has_no_tenant(pass_client_key):
    with serve_app(scope_app({}, pass_client_key=pass_client_key)) as url:
        with httpx.Client(base_url=url) as http:
            seen = http.get("/v1/echo", headers={"authorization": "Bearer any-client-key"}).json()
            assert seen["tenant"] is None
            assert seen["client_key"] == ("any-client-key" if pass_client_key else "<unset>")
            assert http.get("/v1/echo").json() == {"tenant": None, "client_key": "<unset>"}


def test_paths_are_matched_as_the_router_sees_them():
    """Behind a proxy prefix (uvicorn ``root_path``) the check still applies to ``/v1/…``."""
    with serve_app(scope_app(load_api_keys(KEY_A, None)), root_path="/api") as url:
        with httpx.Client(base_url=url) as http:
            invalid_key_body(http.get("/v1/echo"))
            ok = http.get("/v1/echo", headers={"authorization": f"Bearer {KEY_A}"})
            assert ok.json()["tenant"] == "tenant_" + sha(KEY_A)[:16]
            assert http.get("/healthz").json()["tenant"] == "<unset>"


def test_websockets_under_v1_need_a_key_too():
    with serve_app(scope_app(load_api_keys(KEY_A, None))) as url:
        ws_url = url.replace("http://", "ws://") + "/v1/ws"
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url, open_timeout=10).close()
        # Refused before the handshake, as an HTTP 401 with the OpenAI error body.
        assert info.value.response.status_code == 401
        assert orjson.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": f"Bearer {KEY_A}"}
        with connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
            assert ws.recv(timeout=10) == "tenant_" + sha(KEY_A)[:16]


def test_only_key_hashes_are_kept(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY_B + "\n")
    with serve_scripted_upstream() as upstream:
        settings = Settings(
            upstream_base_url=upstream.base_url,
            db=str(tmp_path / "db.sqlite"),
            api_keys=KEY_A,
            api_keys_file=str(keys_file),
        )
        app = create_app(settings)
        with serve_app(app) as url:
            with httpx.Client(base_url=url) as http:
                assert http.get("/healthz").status_code == 200
            # The middleware stack exists once the app has served a request: find ours.
            layer, middleware = app.middleware_stack, None
            while layer is not None and middleware is None:
                if isinstance(layer, AuthMiddleware):
                    middleware = layer
                layer = getattr(layer, "app", None)
    assert middleware is not None
    assert set(middleware.key_hashes) == {sha(KEY_A), sha(KEY_B)}
    held = repr({k: v for k, v in vars(middleware).items() if k != "app"})
    assert KEY_A not in held and KEY_B not in held
