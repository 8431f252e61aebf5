"""API keys and tenants: a pure ASGI middleware in front of the OpenAI-compatible routes.

Each configured API key is a tenant. Keys are kept only as SHA-256 hex digests; the tenant id is
derived from the digest (``tenant_<first 16 hex digits>``), so it is stable across restarts and
replicas and reveals nothing about the key.

When keys are configured, every request under ``/v1/`` needs ``Authorization: Bearer <key>``
(401 ``invalid_api_key`` otherwise), except the tool admin API under ``/v1/tools``, which checks
the admin key itself (:mod:`gateway.http.tools`). ``/healthz`` and other paths are always open.
The admin key is accepted too on reads of stored responses (``GET``/``HEAD`` of
``/v1/responses/…`` and ``/v1/stepchain/…``, for the trace viewer): it
is no tenant (``None``), and :func:`caller_is_admin` tells the routes it may read every tenant's
responses. The middleware puts the tenant in ``scope["stepchain.tenant"]`` (None for an open gateway), read by
:func:`gateway.http.responses.tenant_of`, and with ``pass_client_key`` the presented key in
``scope["stepchain.client_key"]`` for calling the upstream with the client's own key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import ConfigError
from gateway.errors import AuthenticationError

from .state import gateway_state

__all__ = [
    "ADMIN_SCOPE_KEY",
    "CLIENT_KEY_SCOPE_KEY",
    "TENANT_SCOPE_KEY",
    "AuthMiddleware",
    "caller_is_admin",
    "hash_key",
    "load_api_keys",
    "route_path",
    "tenant_for_hash",
    "unauthorized",
]

TENANT_SCOPE_KEY = "stepchain.tenant"
CLIENT_KEY_SCOPE_KEY = "stepchain.client_key"
ADMIN_SCOPE_KEY = "stepchain.admin"
# What the admin key may read under /v1/ (the trace viewer's data); it calls no upstream there.
_ADMIN_READABLE = ("/v1/responses/", "/v1/stepchain/")


def _secret(value: Any) -> str | None:
    """A key setting's text (a plain str, or a pydantic SecretStr)."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter is not None else str(value)


def caller_is_admin(request: Request) -> bool:
    """True when the request carries the configured admin key (``Authorization: Bearer``)."""
    if request.scope.get(ADMIN_SCOPE_KEY):
        return True
    admin = _secret(gateway_state(request).settings.admin_key)
    if not admin:
        return False
    token = _bearer(request.scope)
    return token is not None and hmac.compare_digest(token.encode(), admin.encode())


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key (UTF-8), the only form in which keys are kept."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def tenant_for_hash(key_hash: str) -> str:
    """The tenant id of a key, from its digest: ``tenant_`` + the first 16 hex digits."""
    return "tenant_" + key_hash[:16]


def load_api_keys(keys: str | None, keys_file: str | None) -> dict[str, str]:
    """The configured API keys as ``{sha256_hex(key): tenant_id}``.

    ``keys`` is comma-separated; ``keys_file`` holds one key per line (blank lines and lines
    starting with ``#`` are ignored). Surrounding whitespace is stripped. Both may be given; an
    empty result means an open gateway. Raises :class:`gateway.config.ConfigError` if the file
    cannot be read or holds no key (a file was named, so an open gateway is not what was meant).
    """
    raw: list[str] = [k.strip() for k in (keys or "").split(",")]
    if keys_file:
        try:
            with open(keys_file, encoding="utf-8") as fh:
                lines = [line.strip() for line in fh]
        except OSError as exc:
            raise ConfigError(f"api_keys_file: cannot read {keys_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"api_keys_file: {keys_file} is not UTF-8 text") from None
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ConfigError(f"api_keys_file: {keys_file} holds no key")
        raw.extend(from_file)
    hashes = {}
    for key in raw:
        if key:
            digest = hash_key(key)
            hashes[digest] = tenant_for_hash(digest)
    return hashes


def route_path(scope: Scope) -> str:
    """The path the router matches (``root_path`` removed), as starlette computes it."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        if path == root_path:
            return ""
        if path[len(root_path)] == "/":
            return path[len(root_path) :]
    return path


def _bearer(scope: Scope) -> str | None:
    """The token of the first ``Authorization: Bearer …`` header, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip() or None
    return None


class AuthMiddleware:
    """Checks the Bearer key of ``/v1/`` requests and records the caller's tenant in the scope.

    ``key_hashes`` maps key digests to tenant ids (:func:`load_api_keys`); empty = open gateway.
    Only the digests are held. Unknown or missing keys get 401 with the OpenAI error body, code
    ``invalid_api_key``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        key_hashes: Mapping[str, str],
        pass_client_key: bool = False,
        admin_key_hash: str | None = None,
    ) -> None:
        self.app = app
        self.key_hashes = dict(key_hashes)
        self.pass_client_key = pass_client_key
        self.admin_key_hash = admin_key_hash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        if path == "/v1/tools" or path.startswith("/v1/tools/"):
            # The tool admin API checks the admin key; a tenant key grants nothing there.
            await self.app(scope, receive, send)
            return
        missing = self.admit(scope, path)
        if missing is not None:
            await unauthorized(scope, send, missing)
            return
        await self.app(scope, receive, send)

    def admit(self, scope: Scope, path: str) -> bool | None:
        """Check the Bearer key of a ``/v1/`` request (``path``: :func:`route_path`) outside the
        tool admin API. Admitted: the tenant (and admin flag, client key) put in ``scope``,
        returns None. Refused: returns whether the key was missing (for :func:`unauthorized`)."""
        token = _bearer(scope)
        tenant = None
        if self.key_hashes:
            # A dict lookup of a digest: timing reveals nothing about any configured key.
            digest = hash_key(token) if token is not None else None
            tenant = self.key_hashes.get(digest) if digest is not None else None
            if (
                tenant is None
                and digest is not None
                and self.admin_key_hash is not None
                and scope.get("method") in ("GET", "HEAD")
                and path.startswith(_ADMIN_READABLE)
                and hmac.compare_digest(digest, self.admin_key_hash)
            ):
                scope[ADMIN_SCOPE_KEY] = True  # reads every tenant's responses; never a tenant
                scope[TENANT_SCOPE_KEY] = None
                return None
            if tenant is None:
                return token is None
        scope[TENANT_SCOPE_KEY] = tenant
        if self.pass_client_key and token is not None:
            scope[CLIENT_KEY_SCOPE_KEY] = token
        return None


async def unauthorized(scope: Scope, send: Send, missing: bool) -> None:
    """401 with the OpenAI error body; for a WebSocket upgrade the same HTTP response where the
    server offers the ASGI denial-response extension, else a close before accept (HTTP 403)."""
    if missing:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = "Incorrect API key provided."
    body = AuthenticationError(message).to_json()
    prefix = "http."
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        prefix = "websocket.http."
    await send(
        {
            "type": prefix + "response.start",
            "status": AuthenticationError.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": prefix + "response.body", "body": body})
