"""The gateway's exceptions: one tree, each class with its HTTP status and OpenAI ``type``/``code``.

Every error a client can see is a :class:`GatewayError`; it renders as the OpenAI error body::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Tree (status, ``type``, default ``code``)::

    GatewayError                          500 server_error            (also: any unmapped error)
    ├── InvalidRequestError               400 invalid_request_error   (param names the field;
    │   │                                     an upstream's 4xx keeps its status)
    │   └── PreviousResponseNotFoundError 400 …, previous_response_not_found
    ├── AuthenticationError               401 invalid_request_error, invalid_api_key
    ├── PermissionDeniedError             403 invalid_request_error
    ├── NotFoundError                     404 invalid_request_error
    ├── ConflictError                     409 invalid_request_error
    ├── RequestTooLargeError              413 invalid_request_error
    ├── RateLimitError                    429 rate_limit_error, rate_limit_exceeded
    │                                         (insufficient_quota when the quota is gone)
    ├── UpstreamError                     502 upstream_error, upstream_error
    │                                         (the model server or a tool failed)
    ├── ServiceUnavailableError           503 server_error            (shutting down)
    │   └── StoreUnavailableError         503 server_error, store_unavailable
    └── ConfigError                       500 server_error, configuration_error
                                              (a bad setting: start-up stops with one line)

The engine's own bugs (``gateway.engine.loop.EmptyActionError``,
``gateway.engine.transition.ChainNotSettledError``) are plain GatewayErrors (500).

Errors of the lower layers are translated at one boundary, :func:`to_gateway_error`
(``raise to_gateway_error(exc) from exc``), which the HTTP error handler and the WebSocket
transport use::

    store.types.StoreNotFoundError        → NotFoundError (404)
    store.types.StoreConflictError        → ConflictError (409)
    store.types.StepStateError            → ConflictError (409)
    store.types.StoreError (any other)    → StoreUnavailableError (503)
    executors.upstream.UpstreamError      → upstream_error(): the one rule for every endpoint
    executors.reassembly.StreamCutError   → UpstreamError (502)
    executors.http_tool.ToolError         → UpstreamError (502, code = the tool error's type)
    executors.registry.ToolDefinitionError → InvalidRequestError (400, with param)
    executors.egress.EgressError          → InvalidRequestError (400, url_not_allowed)

The one rule for a failed upstream call (:func:`upstream_error`), as OpenAI-compatible clients
expect it: the upstream's 429 → :class:`RateLimitError` (``insufficient_quota`` kept); any other
4xx → :class:`InvalidRequestError` with the upstream's status and message; 5xx, connection
errors, timeouts, cut streams and unreadable bodies → :class:`UpstreamError` (502).

Status codes follow the OpenAI API (and what openai-python maps them to: ``BadRequestError`` for
400, ``NotFoundError`` for 404, …).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConflictError",
    "GatewayError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "PreviousResponseNotFoundError",
    "RateLimitError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "StoreUnavailableError",
    "UpstreamError",
    "is_translated",
    "to_gateway_error",
    "translated_types",
    "upstream_error",
]

INTERNAL_MESSAGE = "The server had an error while processing your request."


class GatewayError(Exception):
    """Base of every client-visible error; renders as an OpenAI error body."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str = INTERNAL_MESSAGE,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        if status_code is not None:  # e.g. an upstream's own 4xx, passed through as it came
            self.status_code = status_code  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequestError(GatewayError):
    """The request body or query is malformed or names something unusable."""

    status_code = 400
    error_type = "invalid_request_error"


class PreviousResponseNotFoundError(InvalidRequestError):
    """``previous_response_id`` names no response this caller may read."""

    default_code = "previous_response_not_found"


class AuthenticationError(GatewayError):
    """No API key, or one the gateway does not know."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    """A valid key that may not do this (e.g. tool registration without the admin key)."""

    status_code = 403
    error_type = "invalid_request_error"


class NotFoundError(GatewayError):
    """The response, tool or route does not exist (or belongs to another tenant)."""

    status_code = 404
    error_type = "invalid_request_error"


class ConflictError(GatewayError):
    """A record with the same unique name exists already, or changed state meanwhile."""

    status_code = 409
    error_type = "invalid_request_error"


class RequestTooLargeError(GatewayError):
    """The request body exceeds the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(GatewayError):
    """The upstream kept rate-limiting us, or its quota is exhausted (code insufficient_quota)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The upstream model server (or a tool server) failed before anything was streamed."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class ServiceUnavailableError(GatewayError):
    """The gateway cannot serve this now (shutting down); try again."""

    status_code = 503
    error_type = "server_error"


class StoreUnavailableError(ServiceUnavailableError):
    """The step-chain store failed (a ``store.types.StoreError``); try again."""

    default_code = "store_unavailable"


class ConfigError(GatewayError, ValueError):
    """A setting with a bad value; the message is one line meant for the operator."""

    default_code = "configuration_error"


# -- the boundary ------------------------------------------------------------------------------


def upstream_error(
    message: str,
    *,
    kind: str | None = None,
    status: int | None = None,
    param: str | None = None,
    code: str | None = None,
) -> GatewayError:
    """The client-visible error for a failed upstream call (the rule in the module docstring).

    ``kind`` is ``executors.upstream.UpstreamError.type`` (``rate_limited``,
    ``insufficient_quota``, ``upstream_timeout``, …), ``status`` the upstream's HTTP status if it
    answered; ``param``/``code`` are the upstream's own, passed on with a 4xx.
    """
    if kind == "insufficient_quota":
        return RateLimitError(message, code="insufficient_quota")
    if kind == "rate_limited" or status == 429:
        return RateLimitError(message)
    if status is not None and 400 <= status < 500:
        return InvalidRequestError(message, param=param, code=code, status_code=status)
    return UpstreamError(message, code=kind if kind and kind != "upstream_error" else None)


def _from_upstream(exc: Any) -> GatewayError:
    param = code = None
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        param = body["error"].get("param") if isinstance(body["error"].get("param"), str) else None
        code = body["error"].get("code") if isinstance(body["error"].get("code"), str) else None
    return upstream_error(str(exc), kind=exc.type, status=exc.status, param=param, code=code)


@functools.cache
def _translations() -> dict[type[BaseException], Callable[[Any], GatewayError]]:
    # Imported here: the lower layers are loaded by then, and importing this module stays cheap.
    from executors.egress import EgressError
    from executors.http_tool import ToolError
    from executors.reassembly import StreamCutError
    from executors.registry import ToolDefinitionError
    from executors.upstream import UpstreamError as UpstreamCallError
    from store.types import StepStateError, StoreConflictError, StoreError, StoreNotFoundError

    return {
        StoreNotFoundError: lambda exc: NotFoundError(str(exc)),
        StoreConflictError: lambda exc: ConflictError(str(exc)),
        StepStateError: lambda exc: ConflictError(str(exc)),
        StoreError: lambda exc: StoreUnavailableError(
            "The response store is unavailable; try again."
        ),
        UpstreamCallError: _from_upstream,
        StreamCutError: lambda exc: UpstreamError(f"the upstream stream broke off: {exc}"),
        ToolError: lambda exc: UpstreamError(exc.message, code=exc.type),
        ToolDefinitionError: lambda exc: InvalidRequestError(exc.message, param=exc.param),
        EgressError: lambda exc: InvalidRequestError(exc.message, code="url_not_allowed"),
    }


def translated_types() -> tuple[type[BaseException], ...]:
    """The lower layers' exception classes :func:`to_gateway_error` translates (their
    subclasses too): what an error handler registers besides :class:`GatewayError`."""
    return tuple(_translations())


def is_translated(cls: type[BaseException]) -> bool:
    """True when ``cls`` is a GatewayError or has a translation (for itself or a base class)."""
    return issubclass(cls, GatewayError) or any(c in _translations() for c in cls.__mro__)


def to_gateway_error(exc: BaseException) -> GatewayError:
    """The client-visible error for ``exc``: itself if it is a GatewayError, else its
    translation (looked up along its class's MRO, ``__cause__`` set to ``exc``), else a plain
    500 :class:`GatewayError` that reveals nothing of ``exc``."""
    if isinstance(exc, GatewayError):
        return exc
    translations = _translations()
    for cls in type(exc).__mro__:
        translate = translations.get(cls)
        if translate is not None:
            error = translate(exc)
            break
    else:
        error = GatewayError(INTERNAL_MESSAGE)
    error.__cause__ = exc
    return error
