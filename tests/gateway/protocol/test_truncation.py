"""Tool output for the model: byte and line limits, UTF-8 boundaries, the marker."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.truncation import (
    count_lines,
    tool_output_text,
    truncate_for_model,
)

MARKER_RE = re.compile(
    r"\n\[output truncated: showed (\d+) of (\d+) bytes, (\d+) of (\d+) lines\]\Z"
)


def split_marker(out: str) -> tuple[str, tuple[int, int, int, int]]:
    match = MARKER_RE.search(out)
    assert match is not None, out[-200:]
    return out[: match.start()], tuple(int(g) for g in match.groups())  # type: ignore[return-value]


@pytest.mark.parametrize(
    "text, lines",
    [
        pytest.param("", 0, id="empty"),
        pytest.param("a", 1, id="one"),
        pytest.param("a\n", 1, id="one-with-newline"),
        pytest.param("a\nb", 2, id="two"),
        pytest.param("a\nb\n", 2, id="two-with-newline"),
        pytest.param("\n\n", 2, id="two-empty"),
    ],
)
def test_count_lines(text: str, lines: int) -> None:
    assert count_lines(text) == lines


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 100, id="exactly-max-bytes"),
        pytest.param("line\n" * 10, id="exactly-max-lines"),
        pytest.param("é" * 50, id="multibyte-at-limit"),
    ],
)
def test_within_limits_is_untouched(text: str) -> None:
    assert truncate_for_model(text, max_bytes=100, max_lines=10) == text


def test_byte_limit_cuts_and_marks() -> None:
    out = truncate_for_model("x" * 250, max_bytes=100, max_lines=10)
    prefix, (shown, total, shown_lines, total_lines) = split_marker(out)
    assert prefix == "x" * 100
    assert (shown, total, shown_lines, total_lines) == (100, 250, 1, 1)
    assert out.endswith("\n[output truncated: showed 100 of 250 bytes, 1 of 1 lines]")


def test_line_limit_cuts_and_marks() -> None:
    text = "".join(f"line {i}\n" for i in range(50))
    out = truncate_for_model(text, max_bytes=10_000, max_lines=3)
    prefix, (shown, total, shown_lines, total_lines) = split_marker(out)
    assert prefix == "line 0\nline 1\nline 2\n"
    assert (shown, total, shown_lines, total_lines) == (21, len(text), 3, 50)


def test_the_first_limit_reached_wins() -> None:
    text = "abcdefghij\n" * 10  # 110 bytes, 10 lines
    by_lines, _ = split_marker(truncate_for_model(text, max_bytes=100, max_lines=2))
    assert by_lines == "abcdefghij\n" * 2
    by_bytes, counts = split_marker(truncate_for_model(text, max_bytes=30, max_lines=5))
    assert by_bytes == text[:30]
    assert counts == (30, 110, 3, 10)


def test_empty_lines_count() -> None:
    prefix, counts = split_marker(truncate_for_model("a\n\n\n\nb", max_lines=2))
    assert prefix == "a\n\n"
    assert counts[2:] == (2, 5)


@pytest.mark.parametrize(
    "char, max_bytes, kept",
    [
        pytest.param("é", 5, 2, id="2-byte-char-cut-after-1"),
        pytest.param("€", 5, 1, id="3-byte-char-cut-after-2"),
        pytest.param("😀", 7, 1, id="4-byte-char-cut-after-3"),
        pytest.param("😀", 8, 2, id="4-byte-char-on-boundary"),
    ],
)
def test_never_splits_a_character(char: str, max_bytes: int, kept: int) -> None:
    prefix, (shown, total, _, _) = split_marker(truncate_for_model(char * 10, max_bytes=max_bytes))
    assert prefix == char * kept
    assert shown == len(prefix.encode()) <= max_bytes
    assert total == len((char * 10).encode())


def test_defaults_are_50kb_and_2000_lines() -> None:
    assert truncate_for_model("x" * 50_000) == "x" * 50_000
    prefix, _ = split_marker(truncate_for_model("x" * 50_001))
    assert len(prefix) == 50_000
    many = "y\n" * 2_001
    prefix, counts = split_marker(truncate_for_model(many))
    assert counts[2:] == (2_000, 2_001)


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(["a", "\n", "é", "€", "😀", " "]), max_size=300),
    max_bytes=st.integers(0, 200),
    max_lines=st.integers(0, 40),
)
def test_output_is_a_prefix_within_limits(text: str, max_bytes: int, max_lines: int) -> None:
    out = truncate_for_model(text, max_bytes=max_bytes, max_lines=max_lines)
    if len(text.encode()) <= max_bytes and count_lines(text) <= max_lines:
        assert out == text
        return
    prefix, (shown, total, shown_lines, total_lines) = split_marker(out)
    assert text.startswith(prefix)
    assert len(prefix.encode()) == shown <= max_bytes
    assert count_lines(prefix) == shown_lines <= max_lines
    assert total == len(text.encode())
    assert total_lines == count_lines(text)
    # The longest such prefix: one more character would break a limit.
    if len(prefix) < len(text):
        longer = text[: len(prefix) + 1]
        assert len(longer.encode()) > max_bytes or count_lines(longer) > max_lines


@pytest.mark.parametrize(
    "output, text",
    [
        pytest.param("plain text", "plain text", id="string-as-is"),
        pytest.param({"temp": 21.5, "city": "Köln"}, '{"temp":21.5,"city":"Köln"}', id="object"),
        pytest.param([1, 2], "[1,2]", id="list"),
        pytest.param(None, "null", id="null"),
    ],
)
def test_tool_output_text(output: object, text: str) -> None:
    assert tool_output_text(output) == text
    if not isinstance(output, str):
        assert orjson.loads(tool_output_text(output)) == output
