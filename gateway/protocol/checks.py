"""Small checks shared by request validation and input conversion.

Each failing check becomes :class:`gateway.errors.InvalidRequestError` with ``param`` naming the
field the way OpenAI does (``input[2].content[0].text``).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequestError

__all__ = ["STRING_FIELDS", "bad_value", "is_int", "is_number", "is_str", "unsupported_value"]

#: Top-level request fields that must be strings when present.
STRING_FIELDS = (
    "instructions", "previous_response_id", "user", "safety_identifier", "prompt_cache_key"
)  # fmt: skip


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bad_value(param: str, expected: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid value for '{param}': expected {expected}.", param=param)


def unsupported_value(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="unsupported_value")
