"""Registered tools: validating their definitions, keeping them in the store, offering them.

A **tool definition** (what ``POST /v1/tools`` takes and the store keeps) is one of::

    HTTP tool:  {"name", "description", "parameters", "kind": "http", "attach", "url",
                 "headers": {name: value | "env:VAR"}, "timeout_s", "idempotent",
                 "allow_private"}
    agent tool: {"name", "description", "parameters", "kind": "agent", "attach", "model",
                 "instructions", "tools": [registered tool names]}
    MCP server: {"name" (its server_label), "description" (its server_description),
                 "kind": "mcp", "attach", "server_url", "headers", "allowed_tools",
                 "require_approval", "timeout_s", "allow_private"}

HTTP tools also take ``require_approval`` (``"never"``, the default, or ``"always"``): a call
then waits for the client's ``mcp_approval_response``. An MCP server's tools are listed per
response chain (``gateway/engine/tool_sources.py``); its ``require_approval`` defaults to
``"always"`` as at OpenAI. ``attach: "on_request"`` MCP servers are used when a request names
them: ``{"type": "mcp", "server_label": NAME}`` without ``server_url``.

``attach`` is ``"always"`` (offered to the model on every request) or ``"on_request"`` (offered
only when the request's ``tools`` names it). ``idempotent`` HTTP tools may be re-run after a
crash. :func:`public_view` is what the admin API returns: literal header values are ``"***"``.

:class:`ToolRegistry` keeps the definitions in the store (so they survive a restart and every
replica sees them) and a cache the hot path reads synchronously; the cache refreshes from the
store at most every ``refresh_s`` seconds (``refresh_if_stale``), so replicas converge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Container, Mapping
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from store.base import Store
from store.types import StoreConflictError, StoreNotFoundError

from .http_tool import ENV_PREFIX, ENV_VAR_PREFIX, resolve_headers
from .mcp_tool import option_problem

__all__ = [
    "AGENT_DEFAULT_PARAMETERS",
    "HIDDEN",
    "ToolDefinitionError",
    "ToolRegistry",
    "public_view",
    "validate_tool_definition",
]

logger = logging.getLogger("stepchain.tools")

# The names the OpenAI API accepts for functions.
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A header value the API shows instead of a literal (secret) one.
HIDDEN = "***"
MAX_TIMEOUT_S = 600

AGENT_DEFAULT_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
}
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

_COMMON_KEYS = ("name", "description", "parameters", "kind", "attach")
_KIND_KEYS = {
    "http": ("url", "headers", "timeout_s", "idempotent", "allow_private", "require_approval"),
    "agent": ("model", "instructions", "tools"),
    "mcp": (
        "server_url", "headers", "timeout_s", "allow_private", "allowed_tools", "require_approval",
    ),
}
_ALL_KEYS = frozenset(
    _COMMON_KEYS + _KIND_KEYS["http"] + _KIND_KEYS["agent"] + _KIND_KEYS["mcp"] + ("object",)
)


class ToolDefinitionError(ValueError):
    """A tool definition that cannot be registered; ``param`` names the field (``headers.X``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _fail(message: str, param: str | None) -> ToolDefinitionError:
    return ToolDefinitionError(message, param)


def _validate_parameters(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise _fail("parameters must be a JSON Schema object.", "parameters")
    declared = schema.get("$schema")
    if declared is not None and (
        not isinstance(declared, str)
        or jsonschema.validators.validator_for(schema, default=None) is None
    ):
        raise _fail(f"parameters: unknown $schema {declared!r}.", "parameters")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = f" at {exc.json_path}" if exc.path else ""
        raise _fail(
            f"parameters is not a valid JSON Schema{where}: {exc.message}", "parameters"
        ) from None
    except RecursionError:
        raise _fail("parameters nests too deeply to be checked.", "parameters") from None
    if schema.get("type") != "object":
        raise _fail('parameters must be a JSON Schema with "type": "object".', "parameters")
    return schema


def _validate_headers(
    headers: Any, previous: Mapping[str, Any] | None, env_prefix: str | None
) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise _fail("headers must be an object of header names to string values.", "headers")
    kept = (previous or {}).get("headers") or {}
    out: dict[str, str] = {}
    for key, value in headers.items():
        param = f"headers.{key}"
        if not _HEADER_NAME_RE.fullmatch(key):
            raise _fail(f"{key!r} is not a valid HTTP header name.", param)
        if not isinstance(value, str):
            raise _fail(f"header {key!r} must be a string.", param)
        if value == HIDDEN:
            # "***" is how the API shows a stored literal value: keep that value (PUT after GET).
            stored = kept.get(key)
            if stored is None or stored.startswith(ENV_PREFIX):
                raise _fail(
                    f"header {key!r}: {HIDDEN!r} stands for a stored value, and there is none; "
                    f"give the value or {ENV_PREFIX}VARIABLE.",
                    param,
                )
            value = stored
        if "\r" in value or "\n" in value:
            raise _fail(f"header {key!r} must not contain a line break.", param)
        if value.startswith(ENV_PREFIX) and not _ENV_VAR_RE.fullmatch(value[len(ENV_PREFIX) :]):
            raise _fail(
                f"header {key!r}: {value!r} must name an environment variable "
                f"({ENV_PREFIX}NAME, letters, digits and _).",
                param,
            )
        if (
            env_prefix is not None
            and value.startswith(ENV_PREFIX)
            and not value[len(ENV_PREFIX) :].startswith(env_prefix)
        ):
            raise _fail(
                f"header {key!r}: {value!r} may only name an environment variable starting with "
                f"{env_prefix} (setting tool_env_prefix), e.g. {ENV_PREFIX}{env_prefix}API_KEY.",
                param,
            )
        out[key] = value
    return out


def _validate_url(url: Any, field: str = "url") -> str:
    if not isinstance(url, str):
        raise _fail(f"{field} is required for an http tool: an http(s) URL.", field)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise _fail(f"{field} is not a valid URL: {exc}.", field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(f"{field} must be an http(s) URL with a host, got {url!r}.", field)
    if parts.username is not None or parts.password is not None:
        raise _fail(f"{field} must not contain credentials; put them in headers (env:NAME).", field)
    return url


def validate_tool_definition(
    body: Any,
    *,
    previous: Mapping[str, Any] | None = None,
    env_prefix: str | None = ENV_VAR_PREFIX,
) -> dict[str, Any]:
    """The normalized definition for a registration body, with defaults filled in.

    ``previous`` is the stored definition being replaced: a header value ``"***"`` keeps its
    stored value. ``env:NAME`` header values must name a variable starting with ``env_prefix``
    (None: any; the config file's tables are checked again when registered). Raises ToolDefinitionError (message and ``param``) for anything unusable,
    including unknown fields and fields of the other kind.
    """
    if not isinstance(body, dict):
        raise _fail("A tool definition must be a JSON object.", None)
    for key in body:
        if key not in _ALL_KEYS:
            raise _fail(
                f"Unknown field {key!r} in the tool definition; expected some of: "
                f"{', '.join(sorted(_ALL_KEYS - {'object'}))}.",
                key,
            )
    if body.get("object", "tool") != "tool":
        raise _fail('object must be "tool" when given.', "object")

    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _fail(
            "name is required: 1 to 64 letters, digits, underscores or dashes "
            f"(a function name the OpenAI API accepts), got {name!r}.",
            "name",
        )
    kind = body.get("kind", "http")
    if not isinstance(kind, str) or kind not in _KIND_KEYS:
        raise _fail(f'kind must be "http", "agent" or "mcp", got {kind!r}.', "kind")
    for key in body:
        if key in _ALL_KEYS and key not in _COMMON_KEYS and key != "object" and key not in _KIND_KEYS[kind]:
            raise _fail(f"{key} is not a field of {kind} tools.", key)
    description = body.get("description", "")
    if not isinstance(description, str):
        raise _fail("description must be a string.", "description")
    attach = body.get("attach", "always")
    if attach not in ("always", "on_request"):
        raise _fail(f'attach must be "always" or "on_request", got {attach!r}.', "attach")
    default_parameters = AGENT_DEFAULT_PARAMETERS if kind == "agent" else _EMPTY_PARAMETERS
    if kind == "mcp" and "parameters" in body:
        raise _fail("parameters is not a field of mcp tool sources (the server lists them).", "parameters")
    parameters = _validate_parameters(body.get("parameters", default_parameters))

    out: dict[str, Any] = {
        "name": name,
        "description": description,
        "parameters": parameters,
        "kind": kind,
        "attach": attach,
    }
    if kind == "mcp":
        return _validate_mcp(body, out, previous, env_prefix)
    if kind == "http":
        approval = body.get("require_approval", "never")
        if approval not in ("always", "never"):
            raise _fail('require_approval must be "always" or "never".', "require_approval")
        out["require_approval"] = approval
        timeout_s = body.get("timeout_s", 30)
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not 0 < timeout_s <= MAX_TIMEOUT_S
        ):
            raise _fail(
                f"timeout_s must be a number of seconds more than 0 and at most {MAX_TIMEOUT_S}, "
                f"got {timeout_s!r}.",
                "timeout_s",
            )
        idempotent = body.get("idempotent", False)
        if not isinstance(idempotent, bool):
            raise _fail("idempotent must be true or false.", "idempotent")
        allow_private = body.get("allow_private", False)
        if not isinstance(allow_private, bool):
            raise _fail("allow_private must be true or false.", "allow_private")
        out["url"] = _validate_url(body.get("url"))
        out["headers"] = _validate_headers(body.get("headers", {}), previous, env_prefix)
        out["timeout_s"] = timeout_s
        out["idempotent"] = idempotent
        out["allow_private"] = allow_private
    else:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _fail("model is required for an agent tool: the upstream model name.", "model")
        instructions = body.get("instructions", "")
        if not isinstance(instructions, str):
            raise _fail("instructions must be a string.", "instructions")
        tools = body.get("tools", [])
        if not isinstance(tools, list):
            raise _fail("tools must be a list of registered tool names.", "tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, str) or not NAME_RE.fullmatch(tool):
                raise _fail(f"tools[{i}] is not a tool name: {tool!r}.", f"tools[{i}]")
        out["model"] = model
        out["instructions"] = instructions
        out["tools"] = list(dict.fromkeys(tools))
    return out


def _timeout(body: Mapping[str, Any]) -> float:
    timeout_s = body.get("timeout_s", 30)
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not 0 < timeout_s <= MAX_TIMEOUT_S
    ):
        raise _fail(
            f"timeout_s must be a number of seconds more than 0 and at most {MAX_TIMEOUT_S}, "
            f"got {timeout_s!r}.",
            "timeout_s",
        )
    return timeout_s


def _validate_mcp(
    body: Mapping[str, Any],
    out: dict[str, Any],
    previous: Mapping[str, Any] | None,
    env_prefix: str | None,
) -> dict[str, Any]:
    del out["parameters"]
    options = {
        "server_label": out["name"],
        "server_url": body.get("server_url"),
        "allowed_tools": body.get("allowed_tools"),
        "require_approval": body.get("require_approval"),
    }
    if not isinstance(body.get("server_url"), str):
        raise _fail("server_url is required for an mcp tool source: an http(s) URL.", "server_url")
    problem = option_problem(options)
    if problem is not None:
        raise _fail(f"{problem[0]} must be {problem[1]}.", problem[0])
    allow_private = body.get("allow_private", False)
    if not isinstance(allow_private, bool):
        raise _fail("allow_private must be true or false.", "allow_private")
    out["server_url"] = _validate_url(body["server_url"], "server_url")
    out["headers"] = _validate_headers(body.get("headers", {}), previous, env_prefix)
    out["allowed_tools"] = body.get("allowed_tools")
    out["require_approval"] = body.get("require_approval", "always")
    out["timeout_s"] = _timeout(body)
    out["allow_private"] = allow_private
    return out


def public_view(definition: Mapping[str, Any]) -> dict[str, Any]:
    """The definition as the API returns it: ``object: "tool"``, and every literal header value
    replaced by ``"***"`` (``env:NAME`` references stay, they hold no secret)."""
    view = {"object": "tool", **definition}
    headers = definition.get("headers")
    if headers:
        view["headers"] = {
            key: value if value.startswith(ENV_PREFIX) else HIDDEN
            for key, value in headers.items()
        }
    return view


def _responses_tool(definition: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": definition["name"],
        "description": definition.get("description") or "",
        "parameters": definition.get("parameters") or _EMPTY_PARAMETERS,
    }


class ToolRegistry:
    """The registered tools of this gateway: the store is the truth, a cache serves lookups.

    Every method raises the store's errors (``store.types.StoreError``); ``register`` raises its
    StoreConflictError for a taken name, ``replace`` its StoreNotFoundError for a missing one.
    """

    def __init__(
        self,
        store: Store,
        *,
        environ: Mapping[str, str] = os.environ,
        refresh_s: float = 1.0,
        env_prefix: str = ENV_VAR_PREFIX,
    ) -> None:
        self.store = store
        self.environ = environ
        self.env_prefix = env_prefix
        self.refresh_s = refresh_s
        self._tools: dict[str, dict[str, Any]] = {}
        self._offered: dict[str, dict[str, Any]] = {}  # name -> Responses function tool
        self._always: list[str] = []  # always-attached names, sorted
        self._mcp_always: list[str] = []  # always-attached MCP servers, sorted
        self._approval: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    # -- cache -------------------------------------------------------------------------------

    def _set_cache(self, tools: dict[str, dict[str, Any]]) -> None:
        self._tools = tools
        functions = {n: d for n, d in tools.items() if d.get("kind") != "mcp"}
        self._offered = {name: _responses_tool(d) for name, d in functions.items()}
        self._always = sorted(
            n for n, d in functions.items() if d.get("attach", "always") == "always"
        )
        self._approval = frozenset(
            n for n, d in functions.items()
            if d.get("kind") == "http" and d.get("require_approval") == "always"
        )
        self._mcp_always = sorted(
            n for n, d in tools.items() if d.get("kind") == "mcp" and d.get("attach", "always") == "always"
        )

    def _cache_put(self, definition: dict[str, Any]) -> None:
        tools = dict(self._tools)
        tools[definition["name"]] = definition
        self._set_cache(tools)

    async def load(self) -> None:
        """(Re)read every tool from the store into the cache."""
        tools = {t["name"]: t for t in await self.store.list_tools()}
        self._loaded_at = time.monotonic()
        if tools != self._tools:
            self._set_cache(tools)

    async def refresh_if_stale(self) -> None:
        """``load()`` if the cache is older than ``refresh_s`` (one reload for many callers)."""
        if time.monotonic() - self._loaded_at < self.refresh_s:
            return
        async with self._lock:
            if time.monotonic() - self._loaded_at < self.refresh_s:
                return
            await self.load()

    def lookup(self, name: str) -> dict[str, Any] | None:
        """The cached definition of ``name``, or None (no I/O: the hot path)."""
        return self._tools.get(name)

    # -- admin -------------------------------------------------------------------------------

    async def register(self, body: Any) -> dict[str, Any]:
        """Validate and store a new tool; returns its definition.

        Raises ToolDefinitionError, or the store's StoreConflictError if the name is taken.
        """
        definition = validate_tool_definition(body, env_prefix=self.env_prefix)
        await self.store.create_tool(definition)
        self._cache_put(definition)
        return definition

    async def replace(self, name: str, body: Any) -> dict[str, Any]:
        """Replace the tool ``name``; the body's ``name`` must be absent or equal. A header value
        ``"***"`` keeps the stored one. Raises ToolDefinitionError, or the store's StoreNotFoundError."""
        if isinstance(body, dict):
            if "name" in body and body["name"] != name:
                raise _fail(
                    f"name in the body ({body['name']!r}) differs from the tool being replaced "
                    f"({name!r}); delete and register to rename.",
                    "name",
                )
            body = {**body, "name": name}
        previous = await self.store.get_tool(name)
        if previous is None:
            raise StoreNotFoundError(f"tool {name!r} does not exist")
        definition = validate_tool_definition(
            body, previous=previous, env_prefix=self.env_prefix
        )
        await self.store.replace_tool(name, definition)
        self._cache_put(definition)
        return definition

    async def delete(self, name: str) -> bool:
        """Delete the tool ``name``; False if there was none."""
        deleted = await self.store.delete_tool(name)
        if name in self._tools:
            tools = dict(self._tools)
            del tools[name]
            self._set_cache(tools)
        return deleted

    async def get(self, name: str) -> dict[str, Any] | None:
        """The stored definition of ``name`` (from the store, not the cache), or None."""
        return await self.store.get_tool(name)

    async def list(self) -> list[dict[str, Any]]:
        """Every stored definition, by name."""
        return await self.store.list_tools()

    async def upsert_many(self, bodies: list[Any]) -> None:
        """Register or replace the tools declared in the config file (at start-up).

        All are validated before any is written; ToolDefinitionError's message names the tool.
        """
        definitions = []
        for i, body in enumerate(bodies):
            try:
                definitions.append(validate_tool_definition(body, env_prefix=self.env_prefix))
            except ToolDefinitionError as exc:
                label = body.get("name") if isinstance(body, dict) else None
                where = f"tools[{i}]" + (f" ({label!r})" if isinstance(label, str) else "")
                raise ToolDefinitionError(f"{where}: {exc.message}", exc.param) from None
        for definition in definitions:
            try:
                await self.store.create_tool(definition)
            except StoreConflictError:
                await self.store.replace_tool(definition["name"], definition)
            self._cache_put(definition)

    # -- per request -------------------------------------------------------------------------

    def offer(
        self,
        request_tools: list[dict[str, Any]] | None,
        tool_choice: Any,
        *,
        client_only: Container[str] = (),
        server_only: Container[str] = (),
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], frozenset[str]]:
        """The tools for one Responses request: ``(offered, client_tools, hosted_names)``.

        ``request_tools`` are Responses function tools (other types were flattened or left out
        by :func:`gateway.protocol.tools.plan_tools`). ``offered`` is every tool the model sees,
        as Responses function tools: the request's ``tools`` in their order (a registered name →
        the registered tool, hosted; another name → the client's own tool, as given), then the
        forced ``tool_choice`` tool and the ``attach: "always"`` tools not listed yet, by name.
        ``client_tools`` is the client's own subset. Names in ``client_only`` (custom and
        namespaced client tools) are always the client's; names in ``server_only`` (registered
        tools standing in for hosted tool types) are offered only if registered.
        ``tool_choice: "none"`` offers nothing. Non-function request tools are ignored.
        """
        if tool_choice == "none":
            return [], [], frozenset()
        registered = self._offered
        offered: list[dict[str, Any]] = []
        client: list[dict[str, Any]] = []
        hosted: set[str] = set()
        seen: set[str] = set()
        for tool in request_tools or ():
            if not isinstance(tool, dict) or tool.get("type") != "function":
                continue
            name = tool.get("name")
            if not isinstance(name, str) or name in seen:
                continue
            seen.add(name)
            if name in registered and name not in client_only:
                offered.append(registered[name])
                hosted.add(name)
            elif name not in server_only:
                offered.append(tool)
                client.append(tool)
        rest = list(self._always)
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            forced = tool_choice.get("name")
            if isinstance(forced, str) and forced in registered and forced not in seen:
                rest = sorted({*rest, forced})
        for name in rest:
            if name not in seen:
                seen.add(name)
                offered.append(registered[name])
                hosted.add(name)
        return offered, client, frozenset(hosted)

    def mcp_sources(self, request_tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The registered MCP servers a request uses: those it names (``{"type": "mcp",
        "server_label": NAME}`` without ``server_url``), then the ``attach: "always"`` ones."""
        named = []
        for tool in request_tools or ():
            if isinstance(tool, dict) and tool.get("type") == "mcp" and not tool.get("server_url"):
                definition = self._tools.get(tool.get("server_label") or "")
                if definition is not None and definition.get("kind") == "mcp":
                    named.append(definition)
        labels = {t.get("server_label") for t in request_tools or () if isinstance(t, dict) and t.get("type") == "mcp"}
        return named + [self._tools[n] for n in self._mcp_always if n not in labels]

    def approval_required(self) -> frozenset[str]:
        """Registered HTTP tools whose calls wait for the client's approval."""
        return self._approval

    def resolve_header_secrets(self, definition: Mapping[str, Any]) -> dict[str, str]:
        """The definition's headers with ``env:NAME`` values read from the environment.

        Raises ``executors.http_tool.ToolError`` (``configuration_error``) naming a variable
        that is not set, never a value.
        """
        return resolve_headers(definition.get("headers") or {}, self.environ, self.env_prefix)
