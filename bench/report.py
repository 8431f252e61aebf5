"""Rows, the printed table, the targets of issue 6, the machine description and the JSON file.

Every number in a :class:`Row` is milliseconds (latency), requests per second, or microseconds
of CPU per request (server process, load generator). ``added_*`` is the row's percentile minus
the direct-to-upstream baseline's at the same percentile, measured in the same run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "Row",
    "Target",
    "evaluate_targets",
    "floor_notes",
    "machine_info",
    "render_floor_notes",
    "render_table",
    "render_targets",
    "write_json",
]


@dataclass
class Row:
    """One line of the table. ``id`` is stable (``"1/gateway/c16"``) for targets and the JSON."""

    id: str
    scenario: str
    target: str
    concurrency: int | None = None
    requests: int = 0
    errors: int = 0
    rps: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    server_cpu_us: float | None = None
    client_cpu_us: float | None = None
    note: str = ""
    first_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


_COLUMNS = (
    ("scenario", 24, "<"),
    ("target", 18, "<"),
    ("conc", 5, ">"),
    ("n", 6, ">"),
    ("err", 4, ">"),
    ("req/s", 8, ">"),
    ("p50 ms", 8, ">"),
    ("p90 ms", 8, ">"),
    ("p99 ms", 8, ">"),
    ("+p50 ms", 8, ">"),
    ("+p99 ms", 8, ">"),
    ("srv µs/req", 10, ">"),
    ("cli µs/req", 10, ">"),
    ("note", 0, "<"),
)


def _cells(row: Row) -> list[str]:
    return [
        row.scenario,
        row.target,
        "-" if row.concurrency is None else str(row.concurrency),
        str(row.requests),
        str(row.errors),
        _fmt(row.rps, 0),
        _fmt(row.p50_ms),
        _fmt(row.p90_ms),
        _fmt(row.p99_ms),
        _fmt(row.added_p50_ms),
        _fmt(row.added_p99_ms),
        _fmt(row.server_cpu_us, 0),
        _fmt(row.client_cpu_us, 0),
        row.note,
    ]


def render_table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    """The rows as a fixed-width text table, or as a Markdown table for the README."""
    if markdown:
        head = "| " + " | ".join(name for name, _, _ in _COLUMNS) + " |"
        rule = "|" + "|".join("---" if align == "<" else "--:" for _, _, align in _COLUMNS) + "|"
        body = ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
        return "\n".join([head, rule, *body])
    widths = [
        max(width, len(name), *(len(_cells(r)[i]) for r in rows)) if width else 0
        for i, (name, width, _) in enumerate(_COLUMNS)
    ]

    def line(cells: Iterable[str]) -> str:
        out = []
        for cell, width, (_, _, align) in zip(cells, widths, _COLUMNS):
            out.append(cell.ljust(width) if align == "<" else cell.rjust(width))
        return "  ".join(out).rstrip()

    lines = [line(name for name, _, _ in _COLUMNS)]
    lines.append("-" * len(lines[0]))
    previous = None
    for row in rows:
        group = row.scenario.split(" ", 1)[0]
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append(line(_cells(row)))
    return "\n".join(lines)


@dataclass
class Target:
    """One target of issue 6: ``met`` is None when it could not be measured in this run."""

    name: str
    limit: str
    measured: str
    met: bool | None


def _find(rows: Sequence[Row], row_id: str) -> Row | None:
    return next((r for r in rows if r.id == row_id), None)


def _le(value: float | None, limit: float) -> bool | None:
    if value is None or math.isnan(value):
        return None
    return value <= limit


def _ratio_target(name: str, limit: str, ours: float | None, theirs: float | None, bound: float,
                  what: str = "") -> Target:  # fmt: skip
    """``ours ÷ theirs ≤ bound`` (n/a when either side did not run)."""
    if ours is None or theirs is None or theirs <= 0 or math.isnan(ours) or math.isnan(theirs):
        return Target(name, limit, "not run", None)
    ratio = ours / theirs
    return Target(name, limit, f"{ratio:.2f}× ({what}{_fmt(ours)} vs {_fmt(theirs)})", ratio <= bound)


def evaluate_targets(rows: Sequence[Row], *, quick: bool) -> list[Target]:
    """Issue 15's targets (ratios in one run: the floor proxy, agentic-api, LiteLLM) and the
    absolute ones still in force (scenarios 3, 5, 7, 9), against this run's rows.

    A --quick run evaluates them too, but its small counts make them indicative only.
    """
    targets: list[Target] = []
    s1 = _find(rows, "1/gateway/c16")
    s1c1 = _find(rows, "1/gateway/c1")
    floor = _find(rows, "1/floor-starlette/c16")
    agentic = _find(rows, "1/agentic/c16")
    agentic_c1 = _find(rows, "1/agentic/c1")
    cpu = lambda row: row.server_cpu_us if row else None  # noqa: E731
    added = lambda row: row.added_p50_ms if row else None  # noqa: E731
    targets.append(_ratio_target(
        "scenario 1, c=16: gateway CPU per response ÷ agentic-api's", "≤ 1×", cpu(s1), cpu(agentic), 1.0, "µs ",
    ))  # fmt: skip
    targets.append(_ratio_target(
        "scenario 1, c=16: gateway CPU per response ÷ Starlette floor's", "≤ 1.5×", cpu(s1), cpu(floor), 1.5, "µs ",
    ))  # fmt: skip
    ins_ours = _find(rows, "8/gateway/responses")
    ins_floor = _find(rows, "8/floor-starlette/responses")
    targets.append(_ratio_target(
        "scenario 8: instructions per response ÷ floor's", "≤ 1.5×",
        ins_ours.extra.get("instructions") / 1e6 if ins_ours else None,
        ins_floor.extra.get("instructions") / 1e6 if ins_floor else None, 1.5, "M ",
    ))  # fmt: skip
    targets.append(_ratio_target(
        "scenario 1, c=1: added p50 ÷ agentic-api's", "≤ 1.1×", added(s1c1), added(agentic_c1), 1.1, "ms ",
    ))  # fmt: skip
    s2 = _find(rows, "2/ttfd/gateway/c16")
    a2 = _find(rows, "2/ttfd/agentic/c16")
    targets.append(_ratio_target(
        "scenario 2, c=16: time to first delta p50 ÷ agentic-api's", "≤ 1×",
        s2.p50_ms if s2 else None, a2.p50_ms if a2 else None, 1.0, "ms ",
    ))  # fmt: skip
    targets.append(_ratio_target(
        "scenario 1, c=16: added p99 ÷ agentic-api's", "< 1×",
        s1.added_p99_ms if s1 else None, agentic.added_p99_ms if agentic else None, 0.9999, "ms ",
    ))  # fmt: skip
    s3 = _find(rows, "3/gateway/c16")
    per_step = s3.server_cpu_us / 6 if s3 and s3.server_cpu_us is not None else None
    targets.append(Target(
        "scenario 3, c=16: gateway CPU per recorded step", "≤ 150 µs",
        f"{_fmt(per_step, 0)} µs" if per_step is not None else "not run", _le(per_step, 150.0),
    ))  # fmt: skip
    s5 = next((r for r in rows if r.id.startswith("5/gateway/t") and r.extra.get("turn") == 100), None)
    targets.append(Target(
        "scenario 5: added p50 at turn 100", "≤ 5 ms",
        f"{_fmt(s5.added_p50_ms)} ms" if s5 else "not run (fewer turns)",
        _le(s5.added_p50_ms, 5.0) if s5 else None,
    ))  # fmt: skip
    s7 = _find(rows, "7/gateway")
    per = s7.extra.get("kb_per_stream") if s7 else None
    targets.append(Target(
        "scenario 7: RSS per held stream", "≤ 100 KB",
        f"{_fmt(per, 1)} KB" if per is not None else "not run", _le(per, 100.0),
    ))  # fmt: skip
    s9 = _find(rows, "9/gateway")
    slope = s9.extra.get("slope_mib_per_min") if s9 else None
    targets.append(Target(
        "scenario 9: RSS slope under sustained load", "≤ 1 MiB/min",
        f"{_fmt(slope)} MiB/min" if slope is not None else "not run", _le(slope, 1.0),
    ))  # fmt: skip
    growth = s9.extra["final_mib"] - s9.extra["idle_mib"] if s9 else None
    targets.append(Target(
        "scenario 9: RSS at the end − idle", "≤ 64 MiB",
        f"{_fmt(growth, 0)} MiB" if growth is not None else "not run", _le(growth, 64.0),
    ))  # fmt: skip
    peer = _find(rows, "1/litellm/c16")
    if peer and s1 and peer.added_p50_ms is not None and s1.added_p50_ms:
        ratio = peer.added_p50_ms / s1.added_p50_ms if s1.added_p50_ms > 0 else math.inf
        targets.append(Target(
            "scenario 1, c=16: LiteLLM added p50 ÷ stepchain added p50", "≥ 10×", f"{ratio:.1f}×", ratio >= 10,
        ))  # fmt: skip
    else:
        targets.append(Target(
            "scenario 1, c=16: LiteLLM added p50 ÷ stepchain added p50", "≥ 10×", "peer not run", None,
        ))  # fmt: skip
    pg1, sq1 = _find(rows, "1/gateway-pg/c1"), _find(rows, "1/gateway/c1")
    if pg1 and sq1 and pg1.added_p50_ms is not None and sq1.added_p50_ms is not None:
        diff = pg1.added_p50_ms - sq1.added_p50_ms
        targets.append(Target(
            "PostgreSQL, scenario 1, c=1: added p50 − SQLite's", "≤ 1 ms",
            f"{diff:+.2f} ms ({_fmt(pg1.added_p50_ms)} vs {_fmt(sq1.added_p50_ms)})", diff <= 1.0,
        ))  # fmt: skip
    else:
        targets.append(Target("PostgreSQL, scenario 1, c=1: added p50 − SQLite's", "≤ 1 ms", "not run", None))
    targets += _event_log_targets(rows)
    two = _find(rows, "10/replicas-2")
    ratio = two.extra.get("throughput_ratio") if two else None
    targets.append(Target(
        "2 replicas on one PostgreSQL: throughput ÷ 1 replica's", "≥ 1.6×",
        f"{ratio:.2f}× (this run used {two.extra.get('cores_busy', 0):.1f} of {os.cpu_count()} cores)"
        if two and ratio is not None else "not run",
        ratio >= 1.6 if ratio is not None else None,
    ))  # fmt: skip
    capped = _find(rows, "10/replicas-2-capped")
    if capped is not None and capped.extra.get("throughput_ratio") is not None:
        ratio = capped.extra["throughput_ratio"]
        targets.append(Target(
            "2 replicas on one PostgreSQL, each capped by a cgroup (own machines, emulated): "
            "throughput ÷ 1 replica's", "≥ 1.6×",
            f"{ratio:.2f}× ({capped.target.split(', ', 1)[1]})", ratio >= 1.6,
        ))  # fmt: skip
    if quick:
        for target in targets:
            if target.met is not None:
                target.measured += " (quick run: indicative)"
    return targets


def _event_log_targets(rows: Sequence[Row]) -> list[Target]:
    """Issue 11: the durable event log adds ≤ 10 % gateway CPU per streamed response — the
    streamed request with it ÷ without it (bench.no_event_log), counted (scenario 8) and timed
    (scenario 2, c=16, SQLite and PostgreSQL, a burst and two pacings), each where it ran."""
    name = "durable event log: streamed gateway CPU with ÷ without it"
    found = []
    for row_id, what in (("8/gateway-nolog/stream", "instructions, scenario 8"),
                         ("8/gateway-pg-nolog/stream", "instructions, scenario 8, PostgreSQL"),
                         ("2/ttlb/gateway-nolog/c16", "CPU µs, scenario 2, c=16, SQLite"),
                         ("2/paced/gateway-nolog/c16", "CPU µs, scenario 2, paced stream, c=16, SQLite"),
                         ("2/paced/gateway-pg-nolog/c16", "CPU µs, scenario 2, paced stream, c=16, PostgreSQL"),
                         ("2/paced20/gateway-nolog/c16", "CPU µs, 20 deltas 20 ms apart, c=16, SQLite"),
                         ("2/paced20/gateway-pg-nolog/c16", "CPU µs, 20 deltas 20 ms apart, c=16, PostgreSQL"),
                         ("2/ttlb/gateway-pg-nolog/c16", "CPU µs, scenario 2, c=16, PostgreSQL")):  # fmt: skip
        row = _find(rows, row_id)
        ratio = row.extra.get("event_log_ratio") if row else None
        if ratio is not None:
            found.append(Target(f"{name} ({what})", "≤ 1.1×", f"{ratio:.2f}×", ratio <= 1.1))
    return found or [Target(name, "≤ 1.1×", "not run", None)]


def floor_notes(rows: Sequence[Row], *, quick: bool) -> list[str]:
    """Informational lines (not targets): what scenario 1's do-nothing proxies add at c=16,
    next to what stepchain adds. Empty when no floor ran."""
    starlette = _find(rows, "1/floor-starlette/c16")
    asgi = _find(rows, "1/floor-asgi/c16")
    if starlette is None and asgi is None:
        return []
    parts = []
    if starlette is not None:
        parts.append(f"a do-nothing Starlette+httpx proxy adds {_fmt(starlette.added_p50_ms)} ms p50")
    if asgi is not None:
        parts.append(f"raw ASGI+aiohttp adds {_fmt(asgi.added_p50_ms)} ms")
    text = "scenario 1, c=16: " + ", ".join(parts)
    ours = _find(rows, "1/gateway/c16")
    if ours is not None:
        text += f"; stepchain adds {_fmt(ours.added_p50_ms)} ms"
    if quick:
        text += " (quick run: indicative)"
    return [text]


def render_floor_notes(notes: Sequence[str]) -> str:
    """The floor lines, aligned under :func:`render_targets`' verdict column."""
    return "\n".join(f"  {'floor':<6}  {note}" for note in notes)


def render_targets(targets: Sequence[Target]) -> str:
    width = max(len(t.name) for t in targets)
    out = []
    for t in targets:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[t.met]
        out.append(f"  {verdict:<6}  {t.name.ljust(width)}  target {t.limit:<9}  measured {t.measured}")
    return "\n".join(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """nproc, CPU model (/proc/cpuinfo), memory, Python and OS versions."""
    mem_kb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` with Row/Target dataclasses as objects, NaN as null, indented."""

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return clean(dataclasses.asdict(obj))
        return obj

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(clean(payload), default=default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
