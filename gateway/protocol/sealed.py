"""Opaque tokens the gateway hands to clients and takes back: ``encrypted_content``.

A reasoning item's ``encrypted_content`` (returned for ``include: ["reasoning.encrypted_content"]``,
mainly with ``store: false``) and a compaction item's carry state the client must not read or
change but must send back for the next request. :func:`seal` turns a JSON object into such a
token and :func:`unseal` turns it back, with a Fernet key (AES-128-CBC + HMAC-SHA256, from
``cryptography``): tokens are authenticated, so a changed or foreign token is refused.

The key is the ``encrypted_content_key`` setting (a urlsafe-base64 32-byte Fernet key). Every
replica that may receive a token must have the same key. Without the setting the gateway
derives its key from a random secret kept next to the database (see
:func:`gateway.engine.keys.load_or_create_key`), which is enough for one host.
"""

from __future__ import annotations

from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken

from gateway.errors import InvalidRequestError

__all__ = ["new_key", "seal", "unseal"]


def new_key() -> str:
    """A fresh Fernet key (urlsafe base64 text, 44 characters)."""
    return Fernet.generate_key().decode()


def _fernet(key: str | bytes | Fernet) -> Fernet:
    return key if isinstance(key, Fernet) else Fernet(key)


def seal(payload: dict[str, Any], key: str | bytes | Fernet) -> str:
    """``payload`` (a JSON object) as an opaque, authenticated token (urlsafe base64 text)."""
    return _fernet(key).encrypt(orjson.dumps(payload)).decode()


def unseal(token: str, key: str | bytes | Fernet, *, param: str | None = None) -> dict[str, Any]:
    """The JSON object sealed in ``token``.

    Raises InvalidRequestError (400, ``code: "invalid_encrypted_content"``, ``param`` as given)
    if the token was not made with ``key``, was changed, or does not hold a JSON object.
    """
    try:
        payload = orjson.loads(_fernet(key).decrypt(token.encode()))
    except (InvalidToken, orjson.JSONDecodeError, ValueError, TypeError):
        payload = None
    if not isinstance(payload, dict):
        raise InvalidRequestError(
            "The encrypted content could not be decrypted or parsed; it was not made by this "
            "gateway (or with another key).",
            param=param,
            code="invalid_encrypted_content",
        )
    return payload
