"""The store suite runs against both backends: ``store`` (and ``make_store``) are parametrised
``sqlite`` / ``postgres``. Each test runs its coroutines on one event loop (``run``), as a pooled
PostgreSQL store requires."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store import Store, open_store
from tests.store.helpers import loop_runner, run


@pytest.fixture(autouse=True)
def _event_loop() -> Iterator[None]:
    with loop_runner():
        yield


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: an SQLite file path, or the DSN of an empty PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("pg_dsn")


@pytest.fixture
def make_store(store_url: str, _event_loop: None) -> Iterator[Callable[[], Store]]:
    """A factory of further (unopened) stores on the same database: a second process's view."""
    made: list[Store] = []

    def make() -> Store:
        made.append(open_store(store_url))
        return made[-1]

    yield make
    for s in made:
        run(s.close())


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    """An open store on a fresh database, closed after the test."""
    s = make_store()
    run(s.open())
    return s
