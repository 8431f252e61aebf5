"""The step-chain store: one async interface (:class:`Store`), SQLite and PostgreSQL backends.

:func:`open_store` picks the backend from a URL; call ``await store.open()`` before use.
"""

from __future__ import annotations

import re
from typing import Any

from .base import Store
from .types import (
    MODEL_CALL,
    TOOL_CALL,
    StoreConflictError,
    ConversationRecord,
    Fence,
    FencedError,
    StoreNotFoundError,
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreError,
    StoreUnavailableError,
    new_id,
)

__all__ = [
    "StoreConflictError",
    "ConversationRecord",
    "Fence",
    "FencedError",
    "MODEL_CALL",
    "StoreNotFoundError",
    "ResponseRecord",
    "Step",
    "StepDescriptor",
    "StepStateError",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "TOOL_CALL",
    "new_id",
    "open_store",
    "redact_url",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)[^/@]*@")
_PASSWORD_PARAM = re.compile(r"((?:^|[?&;\s])password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^&;\s]*)", re.I)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs): the user part's
    (``scheme://user:pw@host``) and a ``password=`` parameter's (``?password=pw``, or a
    libpq ``key=value`` string's)."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD.sub(r"\1***@", url))


def open_store(url: str, *, synchronous: str | None = None, **options: Any) -> Store:
    """The store for ``url`` (not yet opened):

    - a plain path (``stepchain.db``, ``/var/lib/x.db``) or ``sqlite:///path`` (absolute:
      ``sqlite:////var/lib/x.db``; relative: ``sqlite:///x.db``) → :class:`store.sqlite.SQLiteStore`;
    - ``postgresql://…`` or ``postgres://…`` (any libpq URL) → :class:`store.postgres.PostgresStore`.

    ``synchronous`` is SQLite's ``PRAGMA synchronous`` (ignored by PostgreSQL, whose
    durability is the server's); other ``options`` go to the backend's constructor (e.g.
    ``max_size=20`` for PostgreSQL). Any other scheme raises ValueError naming it (never the
    password).
    """
    if synchronous is not None and not _SCHEME.match(url) or (
        synchronous is not None and url.lower().startswith("sqlite:")
    ):
        options["synchronous"] = synchronous
    match = _SCHEME.match(url)
    if match is None:
        from .sqlite import SQLiteStore

        return SQLiteStore(url, **options)
    scheme = match.group(1).lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        path = url[len(match.group(0)):]
        if path.startswith("/"):
            path = path[1:]  # sqlite:///x.db → x.db; sqlite:////abs → /abs
        if not path:
            raise ValueError("sqlite:// URL without a path; use sqlite:///relative.db or sqlite:////absolute.db")
        return SQLiteStore(path, **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url, **options)
    raise ValueError(
        f"unsupported database URL scheme {scheme!r} in {redact_url(url)!r}: "
        "use a file path, sqlite:///path or postgresql://…"
    )
