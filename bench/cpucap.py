"""Cap a process's CPU with a Linux cgroup: replicas on separate machines, emulated on one.

On a 2-core machine two gateway replicas, PostgreSQL, the upstream and the load generator
share the same two cores, so adding a replica cannot add throughput: the machine is the
bottleneck, not the design. Giving each replica its own CPU quota (``cores`` of a core, by the
kernel's CFS bandwidth control) makes each replica the bottleneck of its own share, as on a
machine of its own, while the shared parts (the database, the upstream, the load) keep the
rest: then 2 replicas vs 1 shows whether anything in the design (the database, its locks,
LISTEN/NOTIFY) keeps a second replica from adding its share.

cgroup v1 (``/sys/fs/cgroup/cpu``, ``cpu.cfs_quota_us``) or v2 (``cpu.max``); needs the right
to create a cgroup (root in a container usually has it). :func:`cap_available` says whether.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cap_available", "cpu_capped"]

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


def _base() -> tuple[Path, bool] | None:
    """``(the cgroup root to create children in, is v2)`` or None."""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, False
    if (_V2 / "cgroup.controllers").exists() and "cpu" in (_V2 / "cgroup.controllers").read_text().split():
        return _V2, True
    return None


def cap_available() -> str | None:
    """None when processes can be capped here, else why not (one line)."""
    base = _base()
    if base is None:
        return "no cgroup cpu controller"
    probe = base[0] / f"stepchain-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot create a cgroup: {exc.strerror}"
    return None


def _cgroup_of(pid: int, v2: bool) -> str:
    """The process's cgroup path under the cpu controller (v1) or the unified hierarchy (v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if (v2 and _id == "0") or (not v2 and "cpu" in controllers.split(",")):
            return path
    return "/"


@contextlib.contextmanager
def cpu_capped(pid: int, cores: float) -> Iterator[None]:
    """Run ``pid`` (all its threads) under a quota of ``cores`` CPUs until the block ends, then
    move it back. Raises OSError when the cgroup cannot be made."""
    base = _base()
    if base is None:
        raise OSError("no cgroup cpu controller")
    root, v2 = base
    home = root / _cgroup_of(pid, v2).lstrip("/")  # where it goes back to
    group = root / f"stepchain-bench-{pid}"
    group.mkdir(exist_ok=True)
    quota = max(1_000, int(cores * _PERIOD_US))
    try:
        if v2:
            (group / "cpu.max").write_text(f"{quota} {_PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):  # the process may have ended
            (home / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()
