"""Remote MCP servers as tool sources: listing their tools and calling them (the gateway is an
MCP client through the official ``mcp`` SDK).

An :class:`MCPServer` is what a request's ``{"type": "mcp", …}`` tool (OpenAI's ``Mcp`` tool:
``server_label``, ``server_url``, ``headers``, ``authorization``, ``allowed_tools``,
``require_approval``, ``server_description``) or a registered ``kind: "mcp"`` tool source
describes. :class:`MCPToolExecutor` talks to it over streamable HTTP (the default) or, for a
``server_url`` whose path ends in ``/sse``, the older HTTP+SSE transport; every request goes
through the egress policy (``executors/egress.py``) and to the address that was checked.

Each operation opens one MCP session (initialize, the request, session end) within the server's
``timeout_s``. Failures raise ``executors.http_tool.ToolError``::

    blocked_url               the egress policy refuses server_url
    timeout                   no complete answer within timeout_s
    connection_error          the server could not be reached or broke the protocol
    mcp_tool_execution_error  the tool answered with ``isError`` (its text is the message)
    response_too_large        the result is larger than max_response_bytes
    invalid_arguments         the model's arguments are not a JSON object

Header values (``authorization`` included) never appear in a message or a log line; values read
from the environment are scrubbed from outputs like HTTP tools' are.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from .egress import EgressError, EgressPolicy, httpx2_egress_transport
from .http_tool import ToolError

__all__ = [
    "MCPServer",
    "MCPToolExecutor",
    "function_names",
    "needs_approval",
    "option_problem",
    "tool_allowed",
]

logger = logging.getLogger("stepchain.mcp")

_FUNCTION_NAME = re.compile(r"[^a-zA-Z0-9_-]")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


@dataclass(frozen=True, slots=True)
class MCPServer:
    """One MCP server as a request or a registration gives it; ``headers`` are resolved (the
    ``authorization`` token already in ``Authorization``), ``secrets`` are env values to scrub."""

    server_label: str
    server_url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    allowed_tools: Any = None
    require_approval: Any = None
    server_description: str | None = None
    allow_private: bool = False
    timeout_s: float = 30.0
    secrets: tuple[bytes, ...] = field(default=(), repr=False)


def _filter_matches(spec: Any, name: str, annotations: Mapping[str, Any] | None) -> bool:
    """An OpenAI tool filter ``{"tool_names": [...], "read_only": bool}`` against one tool."""
    if not isinstance(spec, dict):
        return False
    names = spec.get("tool_names")
    if isinstance(names, list) and name in names:
        return True
    if spec.get("read_only") is True:
        return bool((annotations or {}).get("readOnlyHint"))
    return False


def tool_allowed(allowed_tools: Any, name: str, annotations: Mapping[str, Any] | None = None) -> bool:
    """Whether ``allowed_tools`` (None = all, a list of names, or a filter object) admits it."""
    if allowed_tools is None:
        return True
    if isinstance(allowed_tools, list):
        return name in allowed_tools
    if isinstance(allowed_tools, dict):
        if not allowed_tools.get("tool_names") and allowed_tools.get("read_only") is None:
            return True
        return _filter_matches(allowed_tools, name, annotations)
    return True


def needs_approval(
    require_approval: Any, name: str, annotations: Mapping[str, Any] | None = None
) -> bool:
    """Whether a call of tool ``name`` waits for the client's approval.

    ``"never"`` → no; ``"always"`` or None (OpenAI's default) → yes; the filter form
    ``{"always": {...}, "never": {...}}``: a tool matched by ``never`` needs none, one matched by
    ``always`` needs it; an unmatched tool needs it unless only ``always`` was given.
    """
    if require_approval == "never":
        return False
    if not isinstance(require_approval, dict):
        return True
    always, never = require_approval.get("always"), require_approval.get("never")
    if _filter_matches(never, name, annotations):
        return False
    if _filter_matches(always, name, annotations):
        return True
    return never is not None or always is None


def function_names(
    listings: Sequence[tuple[str, Sequence[str]]], taken: set[str]
) -> dict[str, tuple[str, str]]:
    """Function names for the upstream model: ``{function name: (server_label, tool name)}``.

    ``listings`` is ``[(server_label, [tool names])]`` in request order. A tool keeps its own name
    (made OpenAI-safe, at most 64 characters) unless that name is in ``taken`` or already used;
    then it is ``<label>__<name>``, then with a numeric suffix. Deterministic for the same input.
    """
    out: dict[str, tuple[str, str]] = {}
    used = set(taken)
    for label, names in listings:
        for name in names:
            base = _FUNCTION_NAME.sub("_", name)[:64] or "tool"
            candidate = base
            if candidate in used:
                candidate = f"{_FUNCTION_NAME.sub('_', label)}__{base}"[:64]
            n = 2
            while candidate in used:
                suffix = f"_{n}"
                candidate = f"{_FUNCTION_NAME.sub('_', label)}__{base}"[: 64 - len(suffix)] + suffix
                n += 1
            used.add(candidate)
            out[candidate] = (label, name)
    return out


def _content_text(result: Any) -> str:
    """A CallToolResult as the output text OpenAI's ``mcp_call.output`` carries."""
    texts: list[str] = []
    for item in getattr(result, "content", None) or ():
        if getattr(item, "type", None) == "text":
            texts.append(item.text)
        else:
            texts.append(orjson.dumps(item.model_dump(mode="json", exclude_none=True)).decode())
    if not texts and getattr(result, "structured_content", None) is not None:
        return orjson.dumps(result.structured_content).decode()
    return "\n".join(texts)


def _detail(exc: BaseException) -> str:
    """A short, secret-free description of what went wrong underneath."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, EgressError):
        return exc.message
    name = type(exc).__name__
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    text = _URL.sub("<url>", text)  # the server's URL is the admin's to see, not the tenant's
    return f"{name}: {text}" if text else name


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` exception in ``exc``, its groups' members, causes and contexts."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


class MCPToolExecutor:
    """Lists and calls tools of MCP servers (one instance per process).

    ``egress`` checks every URL (and pins its address); ``max_response_bytes`` caps a call's
    output text.
    """

    def __init__(self, egress: EgressPolicy, *, max_response_bytes: int = 5_000_000) -> None:
        self.egress = egress
        self.max_response_bytes = max_response_bytes

    async def list_tools(self, server: MCPServer) -> list[dict[str, Any]]:
        """The server's tools as OpenAI's ``McpListToolsTool`` dicts (``name``, ``description``,
        ``input_schema``, ``annotations``), all of them (``allowed_tools`` is applied by the
        caller). Raises ToolError."""

        async def run(session: Any) -> list[dict[str, Any]]:
            tools: list[dict[str, Any]] = []
            from mcp_types import PaginatedRequestParams

            cursor = None
            for _ in range(100):  # pages
                params = PaginatedRequestParams(cursor=cursor) if cursor else None
                result = await session.list_tools(params=params)
                for tool in result.tools:
                    annotations = tool.annotations.model_dump(mode="json", exclude_none=True) if tool.annotations else None
                    tools.append(
                        {
                            "name": tool.name,
                            "description": tool.description,
                            "input_schema": tool.input_schema,
                            "annotations": annotations,
                        }
                    )
                cursor = getattr(result, "next_cursor", None)
                if not cursor:
                    break
            return tools

        return await self._session(server, "list its tools", run)

    async def call(self, server: MCPServer, tool_name: str, arguments: str) -> str:
        """Call ``tool_name`` with the model's raw ``arguments`` JSON; returns the output text.
        Raises ToolError (``mcp_tool_execution_error`` when the tool reports an error)."""
        try:
            args = orjson.loads(arguments) if arguments and not arguments.isspace() else {}
        except orjson.JSONDecodeError as exc:
            raise ToolError(
                "invalid_arguments", f"arguments for tool {tool_name!r} are not valid JSON: {exc}"
            ) from exc
        if not isinstance(args, dict):
            raise ToolError("invalid_arguments", f"arguments for tool {tool_name!r} must be an object")

        async def run(session: Any) -> Any:
            return await session.call_tool(tool_name, args)

        result = await self._session(server, f"run {tool_name!r}", run)
        text = self._scrub(server, _content_text(result))
        if len(text.encode()) > self.max_response_bytes:
            raise ToolError(
                "response_too_large",
                f"tool {tool_name!r} returned more than {self.max_response_bytes} bytes",
            )
        if getattr(result, "is_error", False):
            raise ToolError("mcp_tool_execution_error", text or f"tool {tool_name!r} failed")
        return text

    @staticmethod
    def _scrub(server: MCPServer, text: str) -> str:
        for secret in server.secrets:
            text = text.replace(secret.decode(), "***")
        return text

    async def _session(self, server: MCPServer, what: str, run: Any) -> Any:
        label = server.server_label
        try:
            await self.egress.check_url(server.server_url, allow_private=server.allow_private)
        except EgressError as exc:
            raise ToolError("blocked_url", f"MCP server {label!r}: {exc.message}") from None
        try:
            async with asyncio.timeout(server.timeout_s):
                return await self._open_and_run(server, run)
        except ToolError:
            raise
        except TimeoutError:
            raise ToolError(
                "timeout", f"MCP server {label!r} did not {what} within {server.timeout_s:g} s"
            ) from None
        except Exception as exc:
            blocked = _find(exc, EgressError)
            if blocked is not None:
                assert isinstance(blocked, EgressError)
                raise ToolError("blocked_url", f"MCP server {label!r}: {blocked.message}") from None
            logger.info("MCP server %s: could not %s: %s", label, what, _detail(exc))
            raise ToolError(
                "connection_error", f"MCP server {label!r}: could not {what}: {_detail(exc)}"
            ) from None

    async def _open_and_run(self, server: MCPServer, run: Any) -> Any:
        import httpx2
        from mcp.client.session import ClientSession

        timeout = httpx2.Timeout(server.timeout_s)
        headers = dict(server.headers)
        path = urlsplit(server.server_url).path.rstrip("/")

        def client_factory(
            headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None
        ) -> httpx2.AsyncClient:
            return httpx2.AsyncClient(
                headers=headers,
                timeout=timeout,
                auth=auth,
                transport=httpx2_egress_transport(self.egress, allow_private=server.allow_private),
            )

        if path.endswith("/sse"):
            from mcp.client.sse import sse_client

            transport = sse_client(
                server.server_url,
                headers=headers,
                timeout=server.timeout_s,
                sse_read_timeout=server.timeout_s,
                httpx_client_factory=client_factory,
            )
            async with transport as (read, write):
                async with ClientSession(read, write, read_timeout_seconds=server.timeout_s) as session:
                    await session.initialize()
                    return await run(session)

        from mcp.client.streamable_http import streamable_http_client

        async with client_factory(headers=headers, timeout=timeout) as client:
            async with streamable_http_client(server.server_url, http_client=client) as (read, write):
                async with ClientSession(read, write, read_timeout_seconds=server.timeout_s) as session:
                    await session.initialize()
                    return await run(session)


_LABEL = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _filter_problem(value: Any, param: str) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return param, "an object with tool_names and/or read_only"
    for key in value:
        if key not in ("tool_names", "read_only"):
            return f"{param}.{key}", "absent: a filter has only tool_names and read_only"
    names = value.get("tool_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
    ):
        return f"{param}.tool_names", "a list of tool names"
    if value.get("read_only") is not None and not isinstance(value["read_only"], bool):
        return f"{param}.read_only", "a boolean"
    return None


def option_problem(tool: Mapping[str, Any]) -> tuple[str, str] | None:
    """What is wrong with the MCP options of a request tool or registration, as ``(field,
    expected)`` (None if nothing): ``server_label`` (1–64 letters, digits, ``_``, ``-``),
    ``server_url`` (http(s) URL when given), ``headers`` (strings), ``authorization``,
    ``allowed_tools`` (names or a filter), ``require_approval`` (``"always"``, ``"never"`` or
    ``{"always": filter, "never": filter}``), ``server_description``."""
    label = tool.get("server_label")
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        return "server_label", "1 to 64 letters, digits, underscores or dashes"
    url = tool.get("server_url")
    if url is not None:
        if not isinstance(url, str):
            return "server_url", "an http(s) URL with a host"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            return "server_url", "an http(s) URL with a host"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "server_url", "an http(s) URL with a host"
        if parts.username is not None or parts.password is not None:
            return "server_url", "a URL without credentials (put them in headers or authorization)"
    headers = tool.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            return "headers", "an object of header names to string values"
        for key, value in headers.items():
            if not isinstance(value, str) or "\r" in value or "\n" in value or "\r" in key or "\n" in key:
                return f"headers.{key}", "a string without line breaks"
    authorization = tool.get("authorization")
    if authorization is not None and (
        not isinstance(authorization, str) or "\r" in authorization or "\n" in authorization
    ):
        return "authorization", "a string without line breaks"
    allowed = tool.get("allowed_tools")
    if allowed is not None:
        if isinstance(allowed, list):
            if not all(isinstance(n, str) and n for n in allowed):
                return "allowed_tools", "a list of tool names"
        else:
            problem = _filter_problem(allowed, "allowed_tools")
            if problem is not None:
                return problem
    approval = tool.get("require_approval")
    if approval is not None and approval not in ("always", "never"):
        if not isinstance(approval, dict):
            return "require_approval", '"always", "never" or {"always": {...}, "never": {...}}'
        for key, value in approval.items():
            if key not in ("always", "never"):
                return f"require_approval.{key}", "absent: only always and never"
            if value is not None:
                problem = _filter_problem(value, f"require_approval.{key}")
                if problem is not None:
                    return problem
    description = tool.get("server_description")
    if description is not None and not isinstance(description, str):
        return "server_description", "a string"
    return None
