"""Owner liveness on one host: a process-lifetime ``flock`` per owner on a file beside the
SQLite database (``<db>-owners/<sha256(owner)[:32]>.lock``).

A registered owner holds an exclusive lock on its file for as long as it lives; the kernel
drops the lock when the process dies, however it dies (SIGKILL included). So "the file exists
and its lock can be taken" means "that owner registered and is gone": its responses may be
taken over at once. An owner that never registered has no file and is never judged dead here
(its leases still expire). ``flock`` locks belong to the open file, not the process, so a
second open of the file in the same process conflicts too (unlike ``fcntl``/``lockf``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path

__all__ = ["OwnerLocks"]


class OwnerLocks:
    """The lock files of one database. Thread-safe; nothing here touches the event loop."""

    def __init__(self, db_path: str) -> None:
        self.directory = Path(f"{db_path}-owners")
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, owner: str) -> Path:
        return self.directory / (hashlib.sha256(owner.encode()).hexdigest()[:32] + ".lock")

    def register(self, owner: str) -> bool:
        """Take ``owner``'s lock for this process's lifetime; False if a live process holds it.
        Idempotent. Raises OSError when the directory or file cannot be made."""
        with self._lock:
            if owner in self._held:
                return True
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path(owner), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            self._held[owner] = fd
            return True

    def release(self, owner: str) -> None:
        """Drop ``owner``'s lock (the file stays): from now on ``owner`` counts as gone, exactly
        as after its death, so its unfinished responses may be taken over at once."""
        with self._lock:
            fd = self._held.pop(owner, None)
            if fd is not None:
                os.close(fd)

    def release_all(self) -> None:
        for owner in list(self._held):
            self.release(owner)

    def is_dead(self, owner: str) -> bool:
        """True when ``owner`` registered (its file exists) and no live process holds its lock."""
        if owner in self._held:
            return False
        try:
            fd = os.open(self._path(owner), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False  # never registered (or released cleanly): leases decide
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops the lock we may have taken
        return True
