"""Tool definitions and the registry, on a real SQLite store file."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executors.http_tool import ToolError
from executors.registry import (
    AGENT_DEFAULT_PARAMETERS,
    ToolDefinitionError,
    ToolRegistry,
    public_view,
    validate_tool_definition,
)
from store.sqlite import SQLiteStore
from store.types import StoreConflictError, StoreNotFoundError

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
HTTP = {
    "name": "weather",
    "description": "Weather",
    "parameters": SCHEMA,
    "url": "https://w.example/api",
}
AGENT = {
    "name": "researcher",
    "kind": "agent",
    "model": "m",
    "instructions": "Be brief.",
    "tools": ["weather"],
}


def with_registry(
    tmp_path: Path, fn: Callable[[ToolRegistry], Awaitable[Any]], **kw: Any
) -> Any:
    async def run() -> Any:
        store = SQLiteStore(tmp_path / "tools.db")
        await store.open()
        try:
            registry = ToolRegistry(store, **kw)
            await registry.load()
            return await fn(registry)
        finally:
            await store.close()

    return asyncio.run(run())


# -- validation ---------------------------------------------------------------------------------


def test_http_defaults() -> None:
    assert validate_tool_definition({"name": "t", "url": "http://h/x"}) == {
        "name": "t",
        "description": "",
        "parameters": {"type": "object", "properties": {}},
        "kind": "http",
        "attach": "always",
        "url": "http://h/x",
        "headers": {},
        "timeout_s": 30,
        "idempotent": False,
        "allow_private": False,
        "require_approval": "never",
    }


def test_agent_defaults() -> None:
    assert validate_tool_definition({"name": "a", "kind": "agent", "model": "m"}) == {
        "name": "a",
        "description": "",
        "parameters": AGENT_DEFAULT_PARAMETERS,
        "kind": "agent",
        "attach": "always",
        "model": "m",
        "instructions": "",
        "tools": [],
    }


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(HTTP, id="http"),
        pytest.param(AGENT, id="agent"),
        pytest.param({**HTTP, "name": "a-B_9" * 12 + "abcd"}, id="name-64-chars"),
        pytest.param({**HTTP, "attach": "on_request", "timeout_s": 600, "idempotent": True}, id="all"),
        pytest.param({**HTTP, "timeout_s": 0.5}, id="float-timeout"),
        pytest.param({**HTTP, "headers": {"X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY", "Accept": "a/b"}}, id="headers"),
        pytest.param({**HTTP, "object": "tool"}, id="object-tool-from-a-get"),
        pytest.param(
            {**HTTP, "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", **SCHEMA}},
            id="draft-07",
        ),
    ],
)
def test_good_definitions(body: dict[str, Any]) -> None:
    original = copy.deepcopy(body)
    definition = validate_tool_definition(body)
    assert body == original  # not mutated
    assert "object" not in definition
    assert validate_tool_definition(definition) == definition  # normalized is a fixed point


@pytest.mark.parametrize(
    "body, param, needle",
    [
        pytest.param([], None, "JSON object", id="not-an-object"),
        pytest.param({"url": "http://h"}, "name", "name is required", id="no-name"),
        pytest.param({**HTTP, "name": "has space"}, "name", "1 to 64", id="name-space"),
        pytest.param({**HTTP, "name": "x" * 65}, "name", "1 to 64", id="name-65"),
        pytest.param({**HTTP, "name": "a.b"}, "name", "1 to 64", id="name-dot"),
        pytest.param({**HTTP, "name": "ok\n"}, "name", "1 to 64", id="name-trailing-newline"),
        pytest.param({**HTTP, "color": "red"}, "color", "Unknown field 'color'", id="unknown-key"),
        pytest.param({**HTTP, "model": "m"}, "model", "not a field of http", id="agent-key-on-http"),
        pytest.param({**AGENT, "url": "http://h"}, "url", "not a field of agent", id="http-key-on-agent"),
        pytest.param({**HTTP, "kind": "ftp"}, "kind", "kind must be", id="kind"),
        pytest.param({**HTTP, "attach": "sometimes"}, "attach", "attach must be", id="attach"),
        pytest.param({**HTTP, "description": 3}, "description", "string", id="description"),
        pytest.param({**HTTP, "object": "model"}, "object", "object", id="object"),
        pytest.param({**HTTP, "parameters": "{}"}, "parameters", "JSON Schema object", id="params-str"),
        pytest.param(
            {**HTTP, "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}},
            "parameters",
            "not a valid JSON Schema",
            id="params-bad-type",
        ),
        pytest.param(
            {**HTTP, "parameters": {"type": "object", "required": "city"}},
            "parameters",
            "not a valid JSON Schema",
            id="params-bad-required",
        ),
        pytest.param({**HTTP, "parameters": {"type": "string"}}, "parameters", '"object"', id="params-string"),
        pytest.param({**HTTP, "parameters": {"properties": {}}}, "parameters", '"object"', id="params-no-type"),
        pytest.param(
            {**HTTP, "parameters": {"$schema": "https://nope.example/s", "type": "object"}},
            "parameters",
            "unknown $schema",
            id="params-unknown-draft",
        ),
        pytest.param({"name": "t"}, "url", "url is required", id="no-url"),
        pytest.param({**HTTP, "url": "ftp://h/x"}, "url", "http(s)", id="url-scheme"),
        pytest.param({**HTTP, "url": "http:///x"}, "url", "http(s)", id="url-no-host"),
        pytest.param({**HTTP, "url": "http://h:99999/"}, "url", "not a valid URL", id="url-port"),
        pytest.param({**HTTP, "url": "https://u:p@h/"}, "url", "credentials", id="url-credentials"),
        pytest.param({**HTTP, "timeout_s": 0}, "timeout_s", "more than 0", id="timeout-0"),
        pytest.param({**HTTP, "timeout_s": 601}, "timeout_s", "at most 600", id="timeout-601"),
        pytest.param({**HTTP, "timeout_s": "30"}, "timeout_s", "number", id="timeout-str"),
        pytest.param({**HTTP, "timeout_s": True}, "timeout_s", "number", id="timeout-bool"),
        pytest.param({**HTTP, "idempotent": "yes"}, "idempotent", "true or false", id="idempotent"),
        pytest.param({**HTTP, "headers": []}, "headers", "object", id="headers-list"),
        pytest.param({**HTTP, "headers": {"X-Key": 5}}, "headers.X-Key", "string", id="header-int"),
        pytest.param({**HTTP, "headers": {"X Key": "v"}}, "headers.X Key", "header name", id="header-name"),
        pytest.param({**HTTP, "headers": {"X-A": "a\r\nX-B: b"}}, "headers.X-A", "line break", id="crlf"),
        pytest.param({**HTTP, "headers": {"X-A": "env:1BAD"}}, "headers.X-A", "environment", id="env-name"),
        pytest.param({**HTTP, "headers": {"X-A": "***"}}, "headers.X-A", "stored value", id="hidden-new"),
        pytest.param({**AGENT, "model": ""}, "model", "model is required", id="agent-no-model"),
        pytest.param({**AGENT, "instructions": ["x"]}, "instructions", "string", id="agent-instructions"),
        pytest.param({**AGENT, "tools": "weather"}, "tools", "list", id="agent-tools-str"),
        pytest.param({**AGENT, "tools": ["ok", 3]}, "tools[1]", "not a tool name", id="agent-tool-int"),
    ],
)
def test_bad_definitions(body: Any, param: str | None, needle: str) -> None:
    with pytest.raises(ToolDefinitionError) as info:
        validate_tool_definition(body)
    assert info.value.param == param
    assert needle in info.value.message


# -- public view --------------------------------------------------------------------------------


def test_public_view_hides_literal_header_values() -> None:
    definition = validate_tool_definition(
        {**HTTP, "headers": {"Authorization": "Bearer sk-live-123", "X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY"}}
    )
    view = public_view(definition)
    assert view["object"] == "tool"
    assert view["headers"] == {"Authorization": "***", "X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY"}
    assert definition["headers"]["Authorization"] == "Bearer sk-live-123"  # not mutated
    assert public_view(validate_tool_definition(AGENT))["tools"] == ["weather"]


@settings(max_examples=100, deadline=None)
@given(
    secrets=st.dictionaries(
        st.from_regex(r"X-[A-Za-z0-9]{1,10}", fullmatch=True),
        st.text(st.characters(min_codepoint=33, max_codepoint=0x10FFFF), min_size=1).map(
            lambda s: "sk-" + s
        ),
        min_size=1,
        max_size=5,
    )
)
def test_public_view_never_contains_a_literal_secret(secrets: dict[str, str]) -> None:
    view = public_view(validate_tool_definition({**HTTP, "headers": secrets}))
    dumped = orjson.dumps(view).decode()
    for value in secrets.values():
        assert value not in dumped


# -- the registry on a real store ---------------------------------------------------------------


def test_register_get_list_delete(tmp_path: Path) -> None:
    async def scenario(registry: ToolRegistry) -> None:
        created = await registry.register(HTTP)
        assert created == validate_tool_definition(HTTP)
        assert registry.lookup("weather") == created
        with pytest.raises(StoreConflictError):
            await registry.register({**HTTP, "description": "again"})
        await registry.register(AGENT)
        assert [t["name"] for t in await registry.list()] == ["researcher", "weather"]
        assert await registry.get("weather") == created
        assert await registry.delete("weather") is True
        assert await registry.delete("weather") is False
        assert registry.lookup("weather") is None
        assert await registry.get("weather") is None

    with_registry(tmp_path, scenario)


def test_replace(tmp_path: Path) -> None:
    async def scenario(registry: ToolRegistry) -> None:
        await registry.register({**HTTP, "headers": {"Authorization": "Bearer sk-1"}})
        replaced = await registry.replace("weather", {**HTTP, "description": "New"})
        assert replaced["description"] == "New"
        assert registry.lookup("weather")["description"] == "New"
        with pytest.raises(ToolDefinitionError) as info:
            await registry.replace("weather", {**HTTP, "name": "other"})
        assert info.value.param == "name"
        with pytest.raises(StoreNotFoundError):
            await registry.replace("missing", {"url": "http://h/"})

    with_registry(tmp_path, scenario)


def test_put_after_get_keeps_hidden_header_values(tmp_path: Path) -> None:
    async def scenario(registry: ToolRegistry) -> None:
        await registry.register({**HTTP, "headers": {"Authorization": "Bearer sk-1"}})
        view = public_view(await registry.get("weather"))
        view["description"] = "Edited"
        replaced = await registry.replace("weather", view)
        assert replaced["headers"] == {"Authorization": "Bearer sk-1"}
        assert (await registry.get("weather"))["headers"] == {"Authorization": "Bearer sk-1"}
        with pytest.raises(ToolDefinitionError) as info:
            await registry.replace("weather", {**view, "headers": {"X-New": "***"}})
        assert info.value.param == "headers.X-New"

    with_registry(tmp_path, scenario)


def test_tools_survive_a_store_reopen(tmp_path: Path) -> None:
    async def register(registry: ToolRegistry) -> None:
        await registry.register({**HTTP, "headers": {"Authorization": "Bearer sk-1"}})
        await registry.register(AGENT)

    async def read(registry: ToolRegistry) -> tuple[Any, Any]:
        return registry.lookup("weather"), registry.lookup("researcher")

    with_registry(tmp_path, register)
    weather, researcher = with_registry(tmp_path, read)
    assert weather["headers"] == {"Authorization": "Bearer sk-1"}  # usable after a restart
    assert researcher == validate_tool_definition(AGENT)


def test_config_upsert(tmp_path: Path) -> None:
    async def scenario(registry: ToolRegistry) -> None:
        await registry.register({**HTTP, "description": "from the API"})
        await registry.upsert_many([{**HTTP, "description": "from config"}, AGENT])
        assert (await registry.get("weather"))["description"] == "from config"
        assert registry.lookup("researcher") is not None
        with pytest.raises(ToolDefinitionError) as info:
            await registry.upsert_many(
                [{**HTTP, "name": "fresh"}, {**HTTP, "name": "bad", "url": "x"}]
            )
        assert info.value.message.startswith("tools[1] ('bad'):")
        assert info.value.param == "url"
        assert await registry.get("fresh") is None  # nothing written when one is bad

    with_registry(tmp_path, scenario)


def test_replicas_converge_through_the_store(tmp_path: Path) -> None:
    async def run() -> None:
        a_store, b_store = SQLiteStore(tmp_path / "shared.db"), SQLiteStore(tmp_path / "shared.db")
        await a_store.open()
        await b_store.open()
        try:
            a = ToolRegistry(a_store)
            eager = ToolRegistry(b_store, refresh_s=0)
            lazy = ToolRegistry(b_store, refresh_s=3600)
            for registry in (a, eager, lazy):
                await registry.load()
            await a.register(HTTP)
            await eager.refresh_if_stale()
            await lazy.refresh_if_stale()
            assert eager.lookup("weather") is not None
            assert lazy.lookup("weather") is None  # its cache is fresh enough
            await lazy.load()
            assert lazy.lookup("weather") is not None
            await a.delete("weather")
            await eager.refresh_if_stale()
            assert eager.lookup("weather") is None
        finally:
            await a_store.close()
            await b_store.close()

    asyncio.run(run())


def test_resolve_header_secrets(tmp_path: Path) -> None:
    definition = validate_tool_definition(
        {**HTTP, "headers": {"X-Key": "env:STEPCHAIN_TOOL_WEATHER_KEY", "Accept": "text/plain"}}
    )

    async def scenario(registry: ToolRegistry) -> None:
        resolved = registry.resolve_header_secrets(definition)
        assert resolved == {"X-Key": "k-1", "Accept": "text/plain"}

    with_registry(tmp_path, scenario, environ={"STEPCHAIN_TOOL_WEATHER_KEY": "k-1"})

    async def missing(registry: ToolRegistry) -> None:
        with pytest.raises(ToolError) as info:
            registry.resolve_header_secrets(definition)
        assert info.value.type == "configuration_error"
        assert "STEPCHAIN_TOOL_WEATHER_KEY" in info.value.message

    with_registry(tmp_path, missing, environ={})


# -- offering tools to the model ----------------------------------------------------------------

ALWAYS_B = {"name": "b_always", "url": "http://h/b", "parameters": SCHEMA, "description": "B"}
ALWAYS_A = {"name": "a_always", "url": "http://h/a"}
ON_REQUEST = {"name": "lookup", "url": "http://h/l", "attach": "on_request", "parameters": SCHEMA}
CLIENT = {"type": "function", "name": "client_fn", "parameters": {"type": "object"}, "strict": True}


def offered_registry(tmp_path: Path) -> Callable[..., Any]:
    def offer(tools: Any, tool_choice: Any = "auto") -> Any:
        async def scenario(registry: ToolRegistry) -> Any:
            if registry.lookup("b_always") is None:
                await registry.upsert_many([ALWAYS_B, ALWAYS_A, ON_REQUEST])
            return registry.offer(tools, tool_choice)

        return with_registry(tmp_path, scenario)

    return offer


def names(tools: list[dict[str, Any]]) -> list[str]:
    return [t["name"] for t in tools]


def test_always_tools_are_offered_by_name(tmp_path: Path) -> None:
    offered, client, hosted = offered_registry(tmp_path)(None)
    assert names(offered) == ["a_always", "b_always"]
    assert client == []
    assert hosted == {"a_always", "b_always"}
    assert offered[1] == {
        "type": "function",
        "name": "b_always",
        "description": "B",
        "parameters": SCHEMA,
    }


def test_on_request_tools_only_when_listed(tmp_path: Path) -> None:
    offer = offered_registry(tmp_path)
    assert "lookup" not in names(offer([CLIENT])[0])
    offered, client, hosted = offer([CLIENT, {"type": "function", "name": "lookup"}])
    assert names(offered) == ["client_fn", "lookup", "a_always", "b_always"]
    assert offered[1]["parameters"] == SCHEMA  # the registered schema, though omitted
    assert client == [CLIENT]
    assert hosted == {"lookup", "a_always", "b_always"}


def test_registered_name_in_request_runs_server_side_with_registered_schema(tmp_path: Path) -> None:
    request_tool = {"type": "function", "name": "b_always", "parameters": {"type": "object"}}
    offered, client, hosted = offered_registry(tmp_path)([request_tool])
    assert names(offered) == ["b_always", "a_always"]  # request order first, no duplicate
    assert offered[0]["parameters"] == SCHEMA
    assert client == [] and "b_always" in hosted


def test_tool_choice_none_offers_nothing(tmp_path: Path) -> None:
    assert offered_registry(tmp_path)([CLIENT, {"type": "function", "name": "lookup"}], "none") == (
        [],
        [],
        frozenset(),
    )


def test_forced_tool_choice_offers_an_on_request_tool(tmp_path: Path) -> None:
    offered, _, hosted = offered_registry(tmp_path)(None, {"type": "function", "name": "lookup"})
    assert names(offered) == ["a_always", "b_always", "lookup"]
    assert "lookup" in hosted


def test_request_duplicates_and_non_function_tools_are_dropped(tmp_path: Path) -> None:
    offered, client, _ = offered_registry(tmp_path)(
        [CLIENT, {"type": "web_search"}, {**CLIENT, "description": "dup"}]
    )
    assert names(offered) == ["client_fn", "a_always", "b_always"]
    assert client == [CLIENT]


@pytest.mark.parametrize(
    "variable", ["STEPCHAIN_UPSTREAM_API_KEY", "HOME", "AWS_SECRET_ACCESS_KEY", "STEPCHAIN_TOOLX"]
)
def test_env_headers_only_from_the_tool_prefix(variable: str) -> None:
    with pytest.raises(ToolDefinitionError) as info:
        validate_tool_definition({**HTTP, "headers": {"X-Key": f"env:{variable}"}})
    assert info.value.param == "headers.X-Key"
    assert "'X-Key'" in info.value.message and "STEPCHAIN_TOOL_" in info.value.message
    custom = validate_tool_definition(
        {**HTTP, "headers": {"X-Key": "env:ACME_KEY"}}, env_prefix="ACME_"
    )
    assert custom["headers"] == {"X-Key": "env:ACME_KEY"}
