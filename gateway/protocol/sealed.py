"""Opaque tokens the gateway hands to clients and takes back: ``encrypted_content``.

A reasoning item's ``encrypted_content`` (returned for ``include: ["reasoning.encrypted_content"]``,
mainly with ``store: false``) and a compaction item's carry state the client must not read or
change but must send back for the next request. :func:`seal` turns a JSON object into such a
token and :func:`unseal` turns it back, with a Fernet key (AES-128-CBC + HMAC-SHA256, from
``cryptography``): tokens are authenticated, so a changed or foreign token is refused.

The key is the ``encrypted_content_key`` setting (a urlsafe-base64 32-byte Fernet key, made by
``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``).
Every replica that may receive a token must have the same key. Without the setting the gateway
keeps a random key in a file next to its SQLite database (:func:`load_or_create_key`), which
is enough for the processes of one host.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken

from gateway.errors import InvalidRequestError

__all__ = ["load_or_create_key", "new_key", "seal", "unseal"]


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


def load_or_create_key(path: str) -> str:
    """The key kept in the file ``path``, created (mode 0600, atomically: concurrent workers
    agree on one key) if it does not exist yet. Raises OSError if it cannot be read or made."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        pass
    key = new_key()
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    try:
        os.link(temporary, path)  # fails if another process made the file first
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    with open(path) as fh:
        return fh.read().strip()
