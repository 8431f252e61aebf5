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


def evaluate_targets(rows: Sequence[Row], *, quick: bool) -> list[Target]:
    """The issue's targets (2-core machine, upstream at 0 ms) against this run's rows.

    A --quick run evaluates them too, but its small counts make them indicative only.
    """
    targets: list[Target] = []
    s1 = _find(rows, "1/gateway/c16")
    targets.append(Target(
        "scenario 1, c=16: added p50", "≤ 1.5 ms",
        f"{_fmt(s1.added_p50_ms)} ms" if s1 else "not run", _le(s1.added_p50_ms, 1.5) if s1 else None,
    ))  # fmt: skip
    targets.append(Target(
        "scenario 1, c=16: added p99", "≤ 5 ms",
        f"{_fmt(s1.added_p99_ms)} ms" if s1 else "not run", _le(s1.added_p99_ms, 5.0) if s1 else None,
    ))  # fmt: skip
    s2 = _find(rows, "2/ttfd/gateway/c16")
    targets.append(Target(
        "scenario 2, c=16: added time to first delta, p50", "≤ 1 ms",
        f"{_fmt(s2.added_p50_ms)} ms" if s2 else "not run", _le(s2.added_p50_ms, 1.0) if s2 else None,
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
    peer = _find(rows, "1/litellm/c16")
    if peer and s1 and peer.added_p50_ms is not None and s1.added_p50_ms:
        ratio = peer.added_p50_ms / s1.added_p50_ms if s1.added_p50_ms > 0 else math.inf
        targets.append(Target(
            "scenario 1, c=16: LiteLLM added p50 ÷ stepchain added p50", "≥ 5×",
            f"{ratio:.1f}×", ratio >= 5,
        ))  # fmt: skip
    else:
        targets.append(Target(
            "scenario 1, c=16: LiteLLM added p50 ÷ stepchain added p50", "≥ 5×",
            "peer not run", None,
        ))  # fmt: skip
    if quick:
        for target in targets:
            if target.met is not None:
                target.measured += " (quick run: indicative)"
    return targets


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
