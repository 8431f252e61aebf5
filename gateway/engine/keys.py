"""The key that seals ``encrypted_content`` tokens (:mod:`gateway.protocol.sealed`).

``encrypted_content_key`` (a Fernet key: urlsafe base64 of 32 bytes, ``python -c "from
cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``) when configured:
every replica that may receive a token back needs the same one. Without it the gateway keeps a
random key in a file next to the SQLite database (``<db>.key``, mode 0600), created on first
start and shared by the processes of one host. With a PostgreSQL ``db`` (several replicas, no
shared file) and no key configured, each process makes a random key of its own and says so in
the log: tokens then open only on the process that made them, until it restarts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cryptography.fernet import Fernet

__all__ = ["load_or_create_key"]

logger = logging.getLogger("stepchain.keys")


def _key_file(db: str) -> str | None:
    """Where the key of an SQLite database is kept; None for a server URL or ``:memory:``."""
    if db.startswith("sqlite:///"):
        db = db[len("sqlite:///"):]
    if "://" in db or db in ("", ":memory:"):
        return None
    return db + ".key"


def load_or_create_key(settings: Any) -> str:
    """The sealing key for these settings (see the module docstring). Raises ValueError for a
    configured key that is not a Fernet key, OSError if the key file cannot be read or made."""
    configured = getattr(settings, "encrypted_content_key", None)
    if configured is not None:
        key = configured.get_secret_value() if hasattr(configured, "get_secret_value") else configured
        Fernet(key)  # ValueError for a malformed key
        return key
    path = _key_file(str(settings.db))
    if path is None:
        logger.warning(
            "encrypted_content_key is not set: this process seals encrypted_content with a key "
            "of its own, which other replicas and later restarts cannot open"
        )
        return Fernet.generate_key().decode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding="ascii") as fh:
            key = fh.read().strip()
        Fernet(key)
        return key
    key = Fernet.generate_key().decode()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
    return key
