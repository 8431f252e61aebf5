"""A measurement switch (issue 11): ``stepchain serve`` with the durable event log switched off.

``python -m bench.no_event_log serve …`` (the arguments of ``python -m gateway.cli``) runs the
same gateway, same settings, same store backend, except that the store it is given writes no
streamed events: every write's ``events=`` batch is dropped and ``append_events`` does nothing
(:class:`WithoutEventLog`). Everything else runs as usual — the response builder encodes every
event, the :class:`gateway.engine.live.LiveStream` stages it, the writer hands it to the store
and publishes it once that write returns — so the difference in gateway CPU between this
process and a normal one is what *storing* the events costs: the batches in the step writes,
the flush writes between them, the bytes through the database driver, the NOTIFYs they send.

Only for ``bench/`` (scenario 2's and 8's "event log off" rows). A gateway run this way cannot
replay a stream after a crash or on another replica; never serve users with it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["WithoutEventLog", "main"]

_WRITES = (
    "create_response", "record_steps", "mark_processing", "complete_step", "fail_step",
    "cancel_step", "record_attempt", "update_response",
)  # fmt: skip


class WithoutEventLog:
    """``store`` (a :class:`store.base.Store`) without its event log: the writes in
    :data:`_WRITES` drop their ``events`` argument, :meth:`append_events` stores nothing; every
    other attribute is the wrapped store's."""

    def __init__(self, store: Any) -> None:
        self._store = store
        for name in _WRITES:
            setattr(self, name, self._without_events(getattr(store, name)))

    @staticmethod
    def _without_events(method: Any) -> Any:
        async def write(*args: Any, events: Any = None, **kwargs: Any) -> Any:
            return await method(*args, **kwargs)

        return write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append_events(
        self, response_id: str, first_sequence: int, events: Sequence[bytes], *, fence: Any = None
    ) -> None:
        return None


def main(argv: Sequence[str]) -> int:
    """``gateway.cli``'s main, its app built on a :class:`WithoutEventLog` store."""
    import gateway.http.app as app_module
    from gateway.cli import main as cli_main
    from store import open_store

    create_app = app_module.create_app

    def create_without_event_log(settings: Any, **kwargs: Any) -> Any:
        store = open_store(settings.db, synchronous=settings.sqlite_synchronous)
        return create_app(settings, store=WithoutEventLog(store), **kwargs)

    app_module.create_app = create_without_event_log  # cli.serve imports it when it runs
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
