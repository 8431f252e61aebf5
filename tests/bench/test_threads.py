"""bench.threads: two checkouts' gateways side by side, per-thread CPU per paced response."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from bench import threads
from bench.processes import REPO_ROOT

MARK = "baseline checkout imported"


def _baseline_copy(tmp_path: Path) -> Path:
    """A copy of this checkout's packages whose ``gateway`` says so on stderr when imported."""
    copy = tmp_path / "baseline"
    for package in ("gateway", "store", "executors", "bench"):
        shutil.copytree(REPO_ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "gateway" / "__init__.py", "a") as fh:
        fh.write(f"\nimport sys as _sys\nprint({MARK!r}, __file__, file=_sys.stderr)\n")
    return copy


def test_the_baseline_gateway_runs_the_baseline_checkout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = _baseline_copy(tmp_path)
    argv = [str(baseline), "--streams", "8", "--concurrency", "2", "--deltas", "3", "--ms", "1", "--rounds", "1"]
    assert threads.main(argv) == 0
    out = capsys.readouterr().out
    means = re.findall(r"^\s*(before|after|off)  event loop ([\d,]+)  store ([\d,]+)  rest [\d,]+  total", out, re.M)
    assert [name for name, *_ in means] == ["before", "after", "off"]
    assert all(int(loop.replace(",", "")) > 0 for _, loop, _ in means)  # the main thread did work
    log_dir = Path(re.search(r"logs and databases: (.+)$", out, re.M).group(1))  # type: ignore[union-attr]
    try:
        before, after = (log_dir / "before.log").read_text(), (log_dir / "after.log").read_text()
        assert f"{MARK} {baseline / 'gateway' / '__init__.py'}" in before
        assert MARK not in after  # this checkout's gateway, not the copy's
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def test_thread_cpu_counts_this_process_threads() -> None:
    cpu = threads.thread_cpu_s(os.getpid())
    assert os.getpid() in cpu and all(seconds >= 0 for seconds in cpu.values())


def test_settings_reach_the_benchmarked_gateway(tmp_path: Path) -> None:
    """``start_gateway(settings=…)`` (how ``--stream-flush-s`` reaches all three gateways): the
    gateway reads them — an invalid one stops it at start-up, naming the setting — although
    ``start_server`` drops the caller's own ``STEPCHAIN_*`` variables."""
    from bench.processes import ServerError, start_gateway

    with pytest.raises(ServerError, match="stream_flush_s"):
        start_gateway("http://127.0.0.1:9/v1", tmp_path, name="g", timeout_s=30,
                      settings={"STEPCHAIN_STREAM_FLUSH_S": "-1"})  # fmt: skip
