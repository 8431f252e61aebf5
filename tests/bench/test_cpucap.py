"""bench.cpucap: a process is moved into a CPU-capped cgroup for the block, and back after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpucap import cap_available, cpu_capped


def _group_of(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line.split(":", 2)[2] for line in lines if line.split(":")[1] in ("cpu", "cpu,cpuacct", ""))


def test_a_capped_process_runs_in_its_own_cgroup_with_the_quota_then_goes_back() -> None:
    why_not = cap_available()
    if why_not is not None:
        pytest.skip(why_not)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        before = _group_of(child.pid)
        with cpu_capped(child.pid, 0.25):
            inside = _group_of(child.pid)
            assert inside.endswith(f"stepchain-bench-{child.pid}")
            group = next(p for p in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")) if (p / inside.lstrip("/")).is_dir())
            folder = group / inside.lstrip("/")
            quota = (folder / "cpu.cfs_quota_us") if (folder / "cpu.cfs_quota_us").exists() else folder / "cpu.max"
            assert quota.read_text().split()[0] == "25000"
        assert _group_of(child.pid) == before
        assert not folder.exists()
    finally:
        child.kill()
        child.wait()
