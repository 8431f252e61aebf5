"""The key that seals ``encrypted_content`` tokens (:mod:`gateway.protocol.sealed`).

``encrypted_content_key`` (a Fernet key: urlsafe base64 of 32 bytes, ``python -c "from
cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``) when configured:
every replica that may receive a token back needs the same one. Without it the gateway keeps a
random key in a file next to the database (``<db>.key``, mode 0600), created on first start and
shared by the processes of one host. With a PostgreSQL ``db`` URL that file is
``./stepchain-<hash of the URL>.key`` in the working directory, shared by the replicas of one
host only: replicas on several hosts need ``encrypted_content_key``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

from cryptography.fernet import Fernet

from store import redact_url

__all__ = ["load_or_create_key"]

logger = logging.getLogger("stepchain")


def _key_path(db: str) -> str:
    if db.startswith("sqlite:"):
        path = re.sub(r"^sqlite:/*", "", db) if not db.startswith("sqlite:////") else db[10:]
        return f"{path}.key"
    if "://" not in db:
        return f"{db}.key"
    logger.warning(
        "encrypted_content_key is not set: a key file in the working directory is used, "
        "shared only by the replicas of this host"
    )
    without_password = redact_url(db)
    return f"stepchain-{hashlib.sha256(without_password.encode()).hexdigest()[:16]}.key"


def load_or_create_key(settings: Any) -> str:
    """The sealing key for these settings (see the module docstring). Raises ValueError for a
    configured key that is not a Fernet key, OSError if the key file cannot be read or made."""
    configured = getattr(settings, "encrypted_content_key", None)
    if configured is not None:
        key = configured.get_secret_value() if hasattr(configured, "get_secret_value") else configured
        Fernet(key)  # ValueError for a malformed key
        return key
    path = _key_path(str(settings.db))
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
