"""Running a registered HTTP tool: ``POST url`` with the model's arguments as the JSON body.

Outcome of :meth:`HTTPToolExecutor.call`:

- 2xx with a JSON body → the parsed value; 2xx with any other body → ``{"result": text}``;
- anything else raises :class:`ToolError`, whose ``message`` becomes the failed step's error and
  the ``tool`` message the model sees next, so it can correct itself.

``ToolError.type``::

    invalid_arguments      the arguments are not JSON, or do not match the tool's parameters
    blocked_url            the egress policy refuses the URL (executors/egress.py): a host not
                           allowed, a private address, or the gateway's own socket
    configuration_error    a header names an environment variable that is not set (or unusable)
    timeout                no complete answer within the tool's ``timeout_s``
    connection_error       the connection failed (refused, reset, protocol error, …)
    http_error             a non-2xx status (``status`` set)
    response_too_large     the body is larger than ``max_response_bytes``
    unknown_tool           (raised by the loop) the model named a tool that is not registered

Header values of the form ``env:NAME`` are read from the environment at call time. Header values
(resolved or literal) never appear in a message or a log line, and environment secrets that
a tool echoes back are replaced by ``***`` in its output before it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import logging
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import jsonschema.exceptions
import jsonschema.validators
import orjson

from .egress import ALLOW_PRIVATE_EXTENSION, EgressError, EgressPolicy, host_matches, pin_request
from .quickcheck import compile_quick_check

__all__ = [
    "ENV_PREFIX", "ENV_VAR_PREFIX", "HTTPToolExecutor", "ToolError", "no_cookie_jar", "resolve_headers",
]  # fmt: skip

logger = logging.getLogger("stepchain.tools")

ENV_PREFIX = "env:"
#: The only environment variables ``env:`` header values may read (setting ``tool_env_prefix``):
#: ``env:STEPCHAIN_UPSTREAM_API_KEY`` must never send the upstream key to a tool.
ENV_VAR_PREFIX = "STEPCHAIN_TOOL_"
# How much of a non-2xx body goes into the error message the model sees.
_SNIPPET_CHARS = 500
# Secrets shorter than this are not scrubbed from bodies (they would match ordinary text).
_MIN_SCRUBBED = 4


class ToolError(Exception):
    """A tool call that failed; ``message`` is what the model sees, ``status`` the HTTP status."""

    def __init__(self, type: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.status = status


def resolve_headers(
    headers: Mapping[str, str], environ: Mapping[str, str], var_prefix: str = ENV_VAR_PREFIX
) -> dict[str, str]:
    """``headers`` with every ``env:NAME`` value replaced by ``environ[NAME]``.

    Raises ToolError ``configuration_error`` naming the header and variable (never a value) when
    the variable does not start with ``var_prefix``, is unset, or holds a line break.
    """
    return _resolve(headers, environ, var_prefix)[0]


def _resolve(
    headers: Mapping[str, str], environ: Mapping[str, str], var_prefix: str = ENV_VAR_PREFIX
) -> tuple[dict[str, str], list[bytes]]:
    """The resolved headers and the secret values read from the environment (to scrub)."""
    resolved: dict[str, str] = {}
    secrets: list[bytes] = []
    for key, value in headers.items():
        if value.startswith(ENV_PREFIX):
            var = value[len(ENV_PREFIX) :]
            if not var.startswith(var_prefix):
                raise ToolError(
                    "configuration_error",
                    f"header {key!r} may only read environment variables starting with "
                    f"{var_prefix} (tool_env_prefix), not {var}",
                )
            secret = environ.get(var)
            if secret is None:
                raise ToolError(
                    "configuration_error",
                    f"header {key!r} needs the environment variable {var}, which is not set",
                )
            if "\r" in secret or "\n" in secret:
                raise ToolError(
                    "configuration_error",
                    f"the environment variable {var} (header {key!r}) contains a line break",
                )
            value = secret
            if len(secret) >= _MIN_SCRUBBED:
                secrets.append(secret.encode())
        resolved[key] = value
    return resolved, secrets


def _host_allowed(host: str, allowed: Collection[str]) -> bool:
    return host_matches(host, allowed)


@dataclass(slots=True)
class _PreparedRequest:
    """What every call of one tool definition sends alike."""

    definition: dict[str, Any]  # the definition it was made from (a copy, to compare)
    url: httpx.URL
    headers: httpx.Headers  # the client's defaults + the definition's (env: values blank)
    env_headers: bool  # some header values are read from the environment at call time
    timeout_s: float
    timeout: dict[str, float | None]  # the request's "timeout" extension
    allow_private: bool


def no_cookie_jar() -> http.cookiejar.CookieJar:
    """A cookie jar that keeps no cookie, for the shared tool client (``cookies=`` of
    ``httpx.AsyncClient``): tool calls are stateless, so a cookie one tool call sets is never
    sent on a later call, which could belong to another tenant or another response."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class HTTPToolExecutor:
    """Calls HTTP tools over one shared ``httpx.AsyncClient`` (one instance per process).

    ``max_response_bytes`` caps the (decoded) response body. ``egress`` checks every URL and the
    request goes to the checked address (DNS rebinding); without one, a policy is built from
    ``allowed_hosts`` (None = any; ``*.example.com`` matches subdomains), ``allowed_networks``
    and ``blocked_ports`` (the gateway's own). A definition with ``allow_private: true`` may
    reach private addresses. Redirects are not followed, so a 3xx is an ``http_error`` and
    cannot lead around the policy.

    ``transport`` is ``client``'s transport (the one it was built with): requests then go to it
    directly, with the client's default headers and cookies applied as ``client.send`` would,
    but without its per-request URL merging, cookie-jar round trips and stream wrappers. Without
    a ``client``, the executor makes both.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        max_response_bytes: int = 5_000_000,
        allowed_hosts: Collection[str] | None = None,
        allowed_networks: Collection[str] = (),
        blocked_ports: Collection[int] = (),
        egress: EgressPolicy | None = None,
        environ: Mapping[str, str] = os.environ,
        env_prefix: str = ENV_VAR_PREFIX,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            transport = transport or httpx.AsyncHTTPTransport()
            client = httpx.AsyncClient(transport=transport, cookies=no_cookie_jar())
        self._client = client
        # The client's transport (given with the client, or ours): requests go to it directly,
        # without the client's per-request layers (see _send).
        self._transport = transport
        self.max_response_bytes = max_response_bytes
        self.egress = egress or EgressPolicy(
            allowed_hosts=allowed_hosts, allowed_networks=allowed_networks, own_ports=blocked_ports
        )
        self.environ = environ
        self.env_prefix = env_prefix
        # tool name -> (the schema it was compiled from, its validator, its quick check)
        self._validators: dict[str, tuple[dict[str, Any], Any, Any]] = {}
        # tool name -> what every call of that definition sends alike (see _prepared)
        self._requests: dict[str, _PreparedRequest] = {}

    async def aclose(self) -> None:
        """Close the client if this executor created it."""
        if self._owns_client:
            await self._client.aclose()

    # -- the call ----------------------------------------------------------------------------

    async def call(
        self,
        definition: Mapping[str, Any],
        arguments: str,
        *,
        idempotency_key: str | None = None,
        call_id: str | None = None,
    ) -> Any:
        """Run the HTTP tool ``definition`` (a validated registry definition) with the model's
        raw ``arguments`` JSON text (empty text means ``{}``). Returns the output; raises
        ToolError.

        ``idempotency_key`` (the tool step's id, the same when the step is re-run after a
        take-over) is sent as ``Idempotency-Key`` and the model's ``call_id`` as
        ``X-Stepchain-Call-Id``, so a tool server can tell a re-run from a new call."""
        name = definition["name"]
        args = self._parse_arguments(name, arguments)
        self._validate_arguments(name, definition.get("parameters"), args)
        if self._transport is not None:
            return await self._call_direct(name, definition, args, idempotency_key, call_id)
        url = definition["url"]
        headers, secrets = _resolve(definition.get("headers") or {}, self.environ, self.env_prefix)
        if not any(key.lower() == "content-type" for key in headers):
            headers["content-type"] = "application/json"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if call_id:
            headers["X-Stepchain-Call-Id"] = call_id
        timeout_s = float(definition.get("timeout_s", 30))
        body = orjson.dumps(args)

        with self._map_errors(name, url, timeout_s):
            # The httpx timeout bounds each read; the outer one the whole call (a slow drip).
            async with asyncio.timeout(timeout_s):
                request = self._client.build_request(
                    "POST",
                    url,
                    content=body,
                    headers=headers,
                    timeout=httpx.Timeout(timeout_s),
                    extensions={ALLOW_PRIVATE_EXTENSION: bool(definition.get("allow_private"))},
                )
                await pin_request(self.egress, request, False)
                response = await self._client.send(request, stream=True, follow_redirects=False)
                try:
                    return await self._read(name, response, secrets)
                finally:
                    await response.aclose()

    def _prepared(self, name: str, definition: Mapping[str, Any]) -> _PreparedRequest:
        """The parts of ``definition``'s request that are the same on every call, made once per
        definition (a re-registered tool is a new definition object, compared by value)."""
        cached = self._requests.get(name)
        if cached is not None and (
            cached.definition is definition or cached.definition == definition
        ):
            return cached
        url = definition["url"]
        literal = {
            key: "" if value.startswith(ENV_PREFIX) else value
            for key, value in (definition.get("headers") or {}).items()
        }  # env: values are read at call time; "" keeps their place
        if not any(key.lower() == "content-type" for key in literal):
            literal["content-type"] = "application/json"
        headers = httpx.Headers(self._client.headers)  # as client.build_request merges them
        headers.update(literal)
        timeout_s = float(definition.get("timeout_s", 30))
        prepared = _PreparedRequest(
            definition=dict(definition),
            url=httpx.URL(url),
            headers=headers,
            env_headers=any(v.startswith(ENV_PREFIX) for v in (definition.get("headers") or {}).values()),
            timeout_s=timeout_s,
            timeout=httpx.Timeout(timeout_s).as_dict(),
            allow_private=bool(definition.get("allow_private")),
        )
        self._requests[name] = prepared
        return prepared

    async def _call_direct(
        self,
        name: str,
        definition: Mapping[str, Any],
        args: Any,
        idempotency_key: str | None,
        call_id: str | None,
    ) -> Any:
        """:meth:`call` over the transport: the same request, headers and cookies as
        ``client.send`` would make, built from the definition's cached parts."""
        prepared = self._prepared(name, definition)
        url = prepared.url
        headers = httpx.Headers(prepared.headers)
        ascii_only = prepared.headers.encoding == "ascii"
        secrets: list[bytes] = []
        if prepared.env_headers:
            resolved, secrets = _resolve(definition.get("headers") or {}, self.environ, self.env_prefix)
            for key, value in resolved.items():
                headers[key] = value
                ascii_only = ascii_only and value.isascii()
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
            ascii_only = ascii_only and idempotency_key.isascii()
        if call_id:
            headers["X-Stepchain-Call-Id"] = call_id
            ascii_only = ascii_only and call_id.isascii()
        if ascii_only:
            headers.encoding = "ascii"  # what the property would find, without decoding them all
        timeout_s = prepared.timeout_s
        cookies = self._client.cookies
        transport = self._transport
        assert transport is not None
        with self._map_errors(name, str(url), timeout_s):
            # The httpx timeout bounds each read; the outer one the whole call (a slow drip).
            async with asyncio.timeout(timeout_s):
                request = httpx.Request(
                    "POST", url, content=orjson.dumps(args), headers=headers,
                    extensions={"timeout": prepared.timeout},
                )  # fmt: skip
                if cookies.jar:  # the client's jar, as build_request would send it
                    cookies.set_cookie_header(request)
                await pin_request(self.egress, request, prepared.allow_private)
                response = await transport.handle_async_request(request)
                response.request = request
                try:
                    if "set-cookie" in response.headers or "set-cookie2" in response.headers:
                        cookies.extract_cookies(response)
                    return await self._read(name, response, secrets)
                finally:
                    await response.aclose()

    def _parse_arguments(self, name: str, arguments: str) -> Any:
        if not arguments or arguments.isspace():
            return {}
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            raise ToolError(
                "invalid_arguments", f"arguments for tool {name!r} are not valid JSON: {exc}"
            ) from exc

    def _validate_arguments(self, name: str, schema: Any, args: Any) -> None:
        if schema is None:
            return
        cached = self._validators.get(name)
        if cached is not None and (cached[0] is schema or cached[0] == schema):
            validator, quick = cached[1], cached[2]
        else:
            cls = jsonschema.validators.validator_for(
                schema, default=jsonschema.Draft202012Validator
            )
            validator, quick = cls(schema), compile_quick_check(schema)
            self._validators[name] = (schema, validator, quick)
        if quick is not None and quick(args):
            return  # certainly valid (executors/quickcheck.py): jsonschema would find nothing
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(args))
        except Exception as exc:  # e.g. a $ref that cannot be resolved: the schema's fault
            raise ToolError(
                "configuration_error",
                f"the parameters schema of tool {name!r} cannot be applied: {exc}",
            ) from exc
        if error is None:
            return
        where = error.json_path if error.path else "the top level"
        raise ToolError(
            "invalid_arguments",
            f"arguments for tool {name!r} do not match its parameters at {where}: {error.message}",
        )

    async def _read(self, name: str, response: httpx.Response, secrets: list[bytes]) -> Any:
        status = response.status_code
        ok = 200 <= status < 300
        limit = self.max_response_bytes if ok else _SNIPPET_CHARS * 4
        declared = response.headers.get("content-length")
        if ok and declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._too_large(name)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                if ok:
                    raise self._too_large(name)
                break
        content = b"".join(chunks)
        for secret in secrets:  # a tool that echoes its key must not put it in a step payload
            content = content.replace(secret, b"***")
        encoding = response.charset_encoding or "utf-8"
        if not ok:
            text = content.decode(encoding, errors="replace").strip()
            snippet = text[:_SNIPPET_CHARS] + ("…" if len(text) > _SNIPPET_CHARS else "")
            logger.info("tool %s returned HTTP %d", name, status)
            raise ToolError(
                "http_error",
                f"tool {name!r} returned HTTP {status}" + (f": {snippet}" if snippet else ""),
                status=status,
            )
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            return {"result": content.decode(encoding, errors="replace")}

    def _too_large(self, name: str) -> ToolError:
        return ToolError(
            "response_too_large",
            f"tool {name!r} returned more than {self.max_response_bytes} bytes",
        )

    @contextlib.contextmanager
    def _map_errors(self, name: str, url: str, timeout_s: float) -> Iterator[None]:
        """The one place httpx (and timeout) exceptions become ToolErrors."""
        # Messages name the tool, never its URL: tenants and the model see them.
        try:
            yield
        except ToolError:
            raise
        except EgressError as exc:
            raise ToolError("blocked_url", f"tool {name!r}: {exc.message}") from exc
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise ToolError(
                "timeout", f"tool {name!r} did not answer within {timeout_s:g} s"
            ) from exc
        except httpx.LocalProtocolError as exc:
            # Its text may quote a header value: never pass it on.
            raise ToolError(
                "connection_error", f"tool {name!r}: the request could not be sent"
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            detail = str(exc) or type(exc).__name__
            raise ToolError(
                "connection_error", f"tool {name!r}: the request failed: {detail}"
            ) from exc
