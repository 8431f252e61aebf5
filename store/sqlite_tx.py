"""Transactions and error translation on the SQLite backend's connection (the worker thread's):
``with transaction(conn):`` around one store call's statements, :func:`run_group` for calls
queued together (one COMMIT for all), and :func:`translated` from ``sqlite3``/orjson errors to
the store's (:mod:`store.types`). Nothing here touches the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from .types import StoreConflictError, StoreError

__all__ = ["FOREIGN_ERRORS", "run_group", "transaction", "translate_errors", "translated"]

_UNIQUE_ERRORS = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


class transaction:
    """``with transaction(conn):`` — one ``BEGIN IMMEDIATE`` … ``COMMIT`` around the block
    (``ROLLBACK`` if it raises, or if the COMMIT fails); inside a group (``run_group``) the
    group's transaction is used and the block adds nothing. A class, not a generator: it runs
    on every store call."""

    __slots__ = ("_conn", "_own")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._own = False

    def __enter__(self) -> None:
        conn = self._conn
        if conn.in_transaction:
            return  # inside a group: its transaction makes this call atomic with the others
        # IMMEDIATE takes the write lock up front: a read-then-write transaction can't then fail
        # to upgrade because another process wrote in between (busy_timeout covers the wait).
        conn.execute("BEGIN IMMEDIATE")
        self._own = True

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if not self._own:
            return False
        conn = self._conn
        if exc_type is None:
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        elif conn.in_transaction:
            conn.execute("ROLLBACK")
        return False


def run_group(
    conn: sqlite3.Connection, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]
) -> list[tuple[bool, Any]] | None:
    """Run ``calls`` (``fn(*args)`` each, ``fn`` using ``conn``) in one transaction: one COMMIT
    for all. Returns one ``(ok, result)`` per call, after the COMMIT; or ``None`` when any call
    raised or the transaction could not be run or committed: then everything is rolled back and
    the caller runs the calls one by one, as if never grouped (so a failing call fails alone,
    with its own exception, and the others take effect). Calls rarely fail, so no savepoint per
    call is paid for up front."""
    results: list[tuple[bool, Any]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for fn, args in calls:
            try:
                results.append((True, fn(*args)))
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return None
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return None
    return results


def translated(exc: BaseException) -> BaseException:
    """The :class:`StoreError` for a foreign error (``sqlite3.Error``, orjson's), else ``exc``."""
    if isinstance(exc, sqlite3.IntegrityError):
        if getattr(exc, "sqlite_errorname", None) in _UNIQUE_ERRORS:
            return StoreConflictError(f"already exists: {exc}")
        return StoreError(f"sqlite integrity error: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"sqlite error: {exc}")
    if isinstance(exc, orjson.JSONEncodeError):
        return StoreError(f"value is not JSON-serialisable: {exc}")
    if isinstance(exc, orjson.JSONDecodeError):
        return StoreError(f"corrupt JSON column: {exc}")
    return exc


#: What :func:`translated` turns into a StoreError.
FOREIGN_ERRORS = (sqlite3.Error, orjson.JSONEncodeError, orjson.JSONDecodeError)


@contextmanager
def translate_errors() -> Iterator[None]:
    """The one boundary where foreign errors become :class:`StoreError` subclasses."""
    try:
        yield
    except FOREIGN_ERRORS as exc:
        raise translated(exc) from exc
