"""The remote MCP tool sources of one response, and the approvals its input answers.

For each MCP server a request uses — its ``{"type": "mcp", "server_url", …}`` tools and the
registered MCP servers it names or that are always attached — the gateway needs the server's
tools once per response chain: a listing found earlier in the conversation (an ``mcp_list_tools``
item of a previous response, or resent in ``input``) is reused, any other server is listed now and
the listing becomes an ``mcp_list_tools`` output item of this response, as at OpenAI. A listing
that fails ends the request with HTTP 424 (``external_connector_error``) before anything is
stored.

The listings are kept in the stored request (under :data:`LISTINGS_KEY`, never echoed), so a
response resumed elsewhere or replayed offers the model the same tools under the same function
names without listing again.

Approvals: an ``mcp_approval_response`` in ``input`` answers the ``mcp_approval_request`` item
of the same id (earlier in the conversation); each answered request that has not run yet becomes
an approved (or denied) call that the response runs before its first model call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from executors.http_tool import ToolError, resolve_headers
from executors.mcp_tool import (
    MCPServer,
    MCPToolExecutor,
    function_names,
    needs_approval,
    tool_allowed,
)
from gateway.errors import GatewayError, InvalidRequestError

from .loop import LoopDeps

__all__ = [
    "LISTINGS_KEY",
    "prepare_tool_sources",
    "MCPListToolsError",
    "ResponseTools",
    "approved_calls",
    "collect_servers",
    "list_tools",
    "response_tools",
]

#: Key of the stored request that holds the response's MCP listings (not part of the API).
LISTINGS_KEY = "_stepchain_mcp_listings"

# The label of tools registered on the gateway itself (HTTP tools) in mcp_* items.
GATEWAY_LABEL = "stepchain"


class MCPListToolsError(GatewayError):
    """An MCP server's tools could not be listed (HTTP 424, as OpenAI answers)."""

    status_code = 424
    error_type = "external_connector_error"
    default_code = "mcp_list_tools_failed"


@dataclass(slots=True)
class ResponseTools:
    """What one response offers from MCP servers: ``routes`` (function name → server and tool
    name, for the loop), ``labels`` (function name → ``(server_label, tool name)``, for items),
    ``offered`` (Responses function tools), ``approval`` (function names that wait)."""

    routes: dict[str, tuple[MCPServer, str]] = field(default_factory=dict)
    labels: dict[str, tuple[str, str]] = field(default_factory=dict)
    offered: list[dict[str, Any]] = field(default_factory=list)
    approval: frozenset[str] = frozenset()


def collect_servers(
    request_tools: Any,
    registered: list[dict[str, Any]],
    environ: Mapping[str, str],
    *,
    timeout_s: float = 30.0,
    env_prefix: str = "STEPCHAIN_TOOL_",
) -> list[MCPServer]:
    """The MCP servers of a request: its own ``mcp`` tools (in order), then ``registered``
    (``ToolRegistry.mcp_sources``). Raises InvalidRequestError for a label given twice or a
    ``server_label`` without ``server_url`` that names no registered server."""
    servers: list[MCPServer] = []
    labels: set[str] = set()
    by_name = {d["name"]: d for d in registered}
    for i, tool in enumerate(request_tools or ()):
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        label = tool["server_label"]
        if label in labels:
            raise InvalidRequestError(
                f"Duplicate MCP server_label '{label}'.", param=f"tools[{i}].server_label"
            )
        labels.add(label)
        if not tool.get("server_url"):
            if label not in by_name:
                raise InvalidRequestError(
                    f"MCP tool '{label}' has no server_url and no MCP server of that name is "
                    "registered on the gateway.",
                    param=f"tools[{i}].server_url",
                )
            servers.append(_registered(by_name[label], environ, tool, env_prefix))
            continue
        headers = dict(tool.get("headers") or {})
        if tool.get("authorization"):
            headers["Authorization"] = f"Bearer {tool['authorization']}"
        servers.append(
            MCPServer(
                server_label=label,
                server_url=tool["server_url"],
                headers=headers,
                allowed_tools=tool.get("allowed_tools"),
                require_approval=tool.get("require_approval"),
                server_description=tool.get("server_description"),
                allow_private=False,  # client-supplied URLs are always checked
                timeout_s=timeout_s,
            )
        )
    for definition in registered:
        if definition["name"] not in labels:
            labels.add(definition["name"])
            servers.append(_registered(definition, environ, None, env_prefix))
    return servers


def _registered(
    definition: dict[str, Any],
    environ: Mapping[str, str],
    tool: dict[str, Any] | None,
    env_prefix: str,
) -> MCPServer:
    """A registered MCP server; a request naming it may narrow ``allowed_tools`` and set
    ``require_approval`` (never loosen what the registration requires)."""
    try:
        headers = resolve_headers(definition.get("headers") or {}, environ, env_prefix)
    except ToolError as exc:
        raise MCPListToolsError(
            f"MCP server '{definition['name']}' is misconfigured: {exc.message}"
        ) from None
    secrets = tuple(
        environ[v[4:]].encode()
        for v in (definition.get("headers") or {}).values()
        if v.startswith("env:") and len(environ.get(v[4:], "")) >= 4
    )
    require = definition.get("require_approval", "always")
    allowed = definition.get("allowed_tools")
    if tool is not None:
        if tool.get("require_approval") is not None and require == "never":
            require = tool["require_approval"]
        if allowed is None:
            allowed = tool.get("allowed_tools")
    return MCPServer(
        server_label=definition["name"],
        server_url=definition["server_url"],
        headers=headers,
        allowed_tools=allowed,
        require_approval=require,
        server_description=definition.get("description") or None,
        allow_private=bool(definition.get("allow_private")),
        timeout_s=float(definition.get("timeout_s", 30)),
        secrets=secrets,
    )


def _earlier_listings(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        if item.get("type") == "mcp_list_tools" and not item.get("error"):
            found[item["server_label"]] = item.get("tools") or []
    return found


async def list_tools(
    executor: MCPToolExecutor,
    servers: list[MCPServer],
    earlier: list[dict[str, Any]],
    response_id: str,
) -> list[dict[str, Any]]:
    """One listing per server, ``{"server_label", "item_id", "tools"}``: reused from ``earlier``
    items (``item_id`` None) or listed now, concurrently (``item_id`` ``mcpl_<hex>_<n>``).
    Tools outside a server's ``allowed_tools`` are left out. Raises MCPListToolsError."""
    reused = _earlier_listings(earlier)
    hex_id = response_id.split("_", 1)[-1]
    listings: list[dict[str, Any]] = []
    pending: list[tuple[int, MCPServer]] = []
    for server in servers:
        tools = reused.get(server.server_label)
        listings.append({"server_label": server.server_label, "item_id": None, "tools": tools})
        if tools is None:
            pending.append((len(listings) - 1, server))

    async def one(server: MCPServer) -> list[dict[str, Any]]:
        try:
            return await executor.list_tools(server)
        except ToolError as exc:
            raise MCPListToolsError(
                f"Error retrieving tool list from MCP server: '{server.server_label}'. "
                f"{exc.message}"
            ) from None

    results = await asyncio.gather(*(one(server) for _, server in pending))
    for n, ((position, server), tools) in enumerate(zip(pending, results, strict=True)):
        listings[position]["item_id"] = f"mcpl_{hex_id}_{n}"
        listings[position]["tools"] = [
            t for t in tools if tool_allowed(server.allowed_tools, t["name"], t.get("annotations"))
        ]
    return listings


def response_tools(
    servers: list[MCPServer], listings: list[dict[str, Any]], taken: set[str]
) -> ResponseTools:
    """The functions the model sees for these listings (names in ``taken`` are not reused)."""
    by_label = {s.server_label: s for s in servers}
    usable = [
        (listing, by_label[listing["server_label"]])
        for listing in listings
        if listing["server_label"] in by_label
    ]
    names = function_names(
        [
            (server.server_label, [t["name"] for t in listing["tools"] or ()
                                   if tool_allowed(server.allowed_tools, t["name"], t.get("annotations"))])
            for listing, server in usable
        ],
        taken,
    )
    tools_by_key = {
        (server.server_label, t["name"]): t for listing, server in usable for t in listing["tools"] or ()
    }
    out = ResponseTools()
    approval = set()
    for function, (label, tool_name) in names.items():
        server = by_label[label]
        tool = tools_by_key[(label, tool_name)]
        out.routes[function] = (server, tool_name)
        out.labels[function] = (label, tool_name)
        schema = tool.get("input_schema")
        out.offered.append(
            {
                "type": "function",
                "name": function,
                "description": tool.get("description") or "",
                "parameters": schema if isinstance(schema, dict) else {"type": "object", "properties": {}},
            }
        )
        if needs_approval(server.require_approval, tool_name, tool.get("annotations")):
            approval.add(function)
    out.approval = frozenset(approval)
    return out


def approved_calls(
    items: list[dict[str, Any]],
    input_items: list[dict[str, Any]],
    tools: ResponseTools,
    registered_approval: frozenset[str],
) -> tuple[dict[str, Any], ...]:
    """The calls answered by ``mcp_approval_response`` items of ``input_items`` that have not run
    yet (``items`` is the whole conversation, history and input). Raises InvalidRequestError
    (``input[i].approval_request_id``) for an answer to no known request, or to a tool this
    request no longer offers."""
    requests = {i["id"]: i for i in items if i.get("type") == "mcp_approval_request"}
    ran = {
        i.get("approval_request_id") for i in items if i.get("type") == "mcp_call"
    }
    reverse = {label_tool: fn for fn, label_tool in tools.labels.items()}
    calls: list[dict[str, Any]] = []
    seen: set[str] = set()
    for position, item in enumerate(input_items):
        if item.get("type") != "mcp_approval_response":
            continue
        request_id = item["approval_request_id"]
        param = f"input[{position}].approval_request_id"
        request = requests.get(request_id)
        if request is None:
            raise InvalidRequestError(
                f"No MCP approval request found with id '{request_id}'.", param=param
            )
        if request_id in ran or request_id in seen:
            continue  # answered before (a client resending the conversation)
        seen.add(request_id)
        label, name = request["server_label"], request["name"]
        function = reverse.get((label, name))
        if function is None and label == GATEWAY_LABEL and name in registered_approval:
            function = name
        if function is None:
            raise InvalidRequestError(
                f"The tool '{name}' of MCP server '{label}' is not among this request's tools.",
                param=param,
            )
        calls.append(
            {
                "name": function,
                "call_id": request_id,
                "arguments": request.get("arguments") or "",
                "approved": item["approve"],
                "approval_request_id": request_id,
                "reason": item.get("reason"),
            }
        )
    return tuple(calls)


async def prepare_tool_sources(
    deps: LoopDeps,
    body: dict[str, Any],
    offered: list[dict[str, Any]],
    history: list[dict[str, Any]],
    input_items: list[dict[str, Any]],
    response_id: str,
    *,
    check: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]], ResponseTools, tuple[dict[str, Any], ...]]:
    """MCP servers and approvals of one request: the request body to store (with the
    listings under :data:`LISTINGS_KEY`), the tools to offer, the response's hosted tools, the
    approved calls to run first. A request without MCP tools or approvals passes through
    unchanged. ``check`` is False when a stored request is rebuilt (its listings are reused).
    Raises InvalidRequestError and MCPListToolsError."""
    registry = deps.registry
    tools = body.get("tools")
    sources = registry.mcp_sources(tools)
    wants_mcp = bool(sources) or any(
        isinstance(t, dict) and t.get("type") == "mcp" for t in tools or ()
    )
    answers = any(i.get("type") == "mcp_approval_response" for i in input_items)
    registered_approval = registry.approval_required()
    if not wants_mcp and not answers and not registered_approval:
        return body, offered, ResponseTools(), ()
    stored = body.get(LISTINGS_KEY) if not check else None
    hosted = ResponseTools()
    listings: list[dict[str, Any]] = []
    if wants_mcp:
        servers = collect_servers(
            tools, sources, registry.environ, timeout_s=deps.mcp_timeout_s,
            env_prefix=registry.env_prefix,
        )
        if stored is not None:
            listings = stored.get("listings") or []
        else:
            if deps.mcp_tools is None:
                raise InvalidRequestError("MCP tools are not enabled on this gateway.", param="tools")
            listings = await list_tools(
                deps.mcp_tools, servers, history + input_items, response_id
            )
        hosted = response_tools(servers, listings, {t["name"] for t in offered})
        if body.get("tool_choice") != "none":
            offered = offered + hosted.offered
    offered_names = {t["name"] for t in offered}
    hosted.approval = hosted.approval | (registered_approval & offered_names)
    approved: tuple[dict[str, Any], ...] = ()
    if answers:
        approved = approved_calls(
            history + input_items, input_items, hosted, registered_approval
        )
    if stored is None and (listings or hosted.approval):
        body = {
            **body,
            LISTINGS_KEY: {
                "listings": listings,
                "labels": {fn: list(v) for fn, v in hosted.labels.items()},
                "approval": sorted(hosted.approval),
            },
        }
    elif stored is not None:
        hosted.approval = frozenset(stored.get("approval") or ())
    return body, offered, hosted, approved
