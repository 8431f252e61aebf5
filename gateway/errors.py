"""Errors the gateway reports to clients, each with its HTTP status and OpenAI ``type``/``code``.

Every error a client can see is a subclass of :class:`GatewayError`; one Starlette exception
handler (looked up along the class's MRO) renders them all as the OpenAI error body::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Tree::

    GatewayError                    500 server_error
    ├── InvalidRequestError         400 invalid_request_error   (param names the offending field)
    │   └── PreviousResponseNotFoundError   400, code previous_response_not_found
    ├── AuthenticationError         401 invalid_request_error, code invalid_api_key
    ├── PermissionDeniedError       403 invalid_request_error
    ├── NotFoundError               404 invalid_request_error
    ├── ConflictError               409 invalid_request_error
    ├── RequestTooLargeError        413 invalid_request_error
    ├── RateLimitError              429 rate_limit_exceeded / insufficient_quota
    ├── UpstreamError               502 upstream_error        (the model server failed)
    └── ServiceUnavailableError     503 server_error

Status codes follow the OpenAI API (and what openai-python maps them to: ``BadRequestError`` for
400, ``NotFoundError`` for 404, …).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """Base of every client-visible error; renders as an OpenAI error body."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
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
    """A record with the same unique name exists already."""

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
    """The upstream model server failed before anything was streamed."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class ServiceUnavailableError(GatewayError):
    """The gateway is shutting down or cannot reach its store."""

    status_code = 503
    error_type = "server_error"
