"""Tool output as the model sees it: JSON text, cut to a size the context window can take.

The full output always stays in the store (the step's ``response_payload``); only the ``tool``
message sent upstream is truncated. Limits are UTF-8 bytes and lines, whichever is reached first.
A line is a run of characters ended by ``\\n`` or by the end of the text (so ``"a\\nb"`` and
``"a\\nb\\n"`` are both two lines, and ``""`` is none).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["count_lines", "tool_output_text", "truncate_for_model"]


def count_lines(text: str) -> int:
    """The number of lines in ``text`` (see the module docstring)."""
    if not text:
        return 0
    newlines = text.count("\n")
    return newlines if text.endswith("\n") else newlines + 1


def tool_output_text(output: Any) -> str:
    """The text of a tool message for ``output``: a string as is, anything else as JSON."""
    if isinstance(output, str):
        return output
    return orjson.dumps(output, default=str).decode()


def truncate_for_model(text: str, *, max_bytes: int = 50_000, max_lines: int = 2_000) -> str:
    """``text`` unchanged if it has at most ``max_bytes`` UTF-8 bytes and ``max_lines`` lines;
    otherwise its longest prefix within both limits (never splitting a character) followed by
    ``"\\n[output truncated: showed N of M bytes, K of L lines]"``."""
    # A str's UTF-8 size is at least its length and at most 4x it: skip encoding when that decides.
    if len(text) * 4 <= max_bytes:
        total_bytes = -1
    else:
        total_bytes = len(text.encode())
    total_lines = count_lines(text)
    if total_bytes <= max_bytes and total_lines <= max_lines:
        return text
    if total_bytes < 0:
        total_bytes = len(text.encode())

    prefix = text
    if total_lines > max_lines:
        # Keep the first max_lines lines with their newlines (an empty line still counts).
        end = -1
        for _ in range(max_lines):
            end = text.find("\n", end + 1)
        prefix = text[: end + 1]
    encoded = prefix.encode()
    if len(encoded) > max_bytes:
        # Dropping the bytes of a character cut in half keeps the prefix valid UTF-8.
        prefix = encoded[:max_bytes].decode("utf-8", errors="ignore")
        encoded = prefix.encode()
    return (
        f"{prefix}\n[output truncated: showed {len(encoded)} of {total_bytes} bytes, "
        f"{count_lines(prefix)} of {total_lines} lines]"
    )
