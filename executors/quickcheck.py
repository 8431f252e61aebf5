"""A quick "certainly valid" check of tool arguments for the simple JSON Schemas most tools have.

Validating a call's arguments with ``jsonschema`` costs tens of thousands of instructions even for
``{"type": "object", "properties": {"q": {"type": "string"}}}``; the tool loop does it for every
call. :func:`compile_quick_check` turns a schema built only from the keywords below into a plain
Python predicate, or returns None for any other schema:

- ``type`` (a name or a list of names: ``object``, ``array``, ``string``, ``integer``, ``number``,
  ``boolean``, ``null``), ``properties``, ``required``, ``additionalProperties`` (a boolean or a
  schema of this kind), ``items`` (a schema of this kind);
- annotations, which never make an instance invalid: ``title``, ``description``, ``default``,
  ``examples``, ``$comment``, ``format`` (``jsonschema`` checks no format unless asked to),
  ``deprecated``, ``readOnly``, ``writeOnly``.

The predicate answers True only when ``jsonschema`` (Draft 2020-12 rules, the executor's default;
a schema naming a ``$schema`` is never compiled) would find no error. False means "not
certainly": the caller then validates with ``jsonschema`` as before, which gives the verdict and
the message. So the check can only skip work, never change an outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["compile_quick_check"]

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "format", "deprecated",
     "readOnly", "writeOnly"}
)  # fmt: skip
_KEYWORDS = _ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items"}


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int)


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def compile_quick_check(schema: Any) -> Check | None:
    """A predicate that is True only for instances ``schema`` certainly accepts, or None when
    ``schema`` uses anything beyond the keywords of the module docstring."""
    if not isinstance(schema, dict) or "$schema" in schema:
        return None
    return _compile(schema, 0)


def _compile(schema: Any, depth: int) -> Check | None:
    if schema is True or schema == {}:
        return lambda value: True
    if not isinstance(schema, dict) or depth > 16 or not set(schema) <= _KEYWORDS:
        return None
    checks: list[Check] = []
    kind = schema.get("type")
    if kind is not None:
        names = [kind] if isinstance(kind, str) else kind
        if not isinstance(names, list) or not names or any(n not in _TYPES for n in names):
            return None
        tests = [_TYPES[n] for n in names]
        checks.append(tests[0] if len(tests) == 1 else (lambda v, t=tuple(tests): any(f(v) for f in t)))
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    extra = schema.get("additionalProperties", True)
    if not isinstance(properties, dict) or not isinstance(required, list):
        return None
    if not all(isinstance(r, str) for r in required):
        return None
    compiled: dict[str, Check] = {}
    for key, sub in properties.items():
        check = _compile(sub, depth + 1)
        if check is None:
            return None
        compiled[key] = check
    extra_check = None if extra is False else _compile(extra, depth + 1)
    if extra is not False and extra_check is None:
        return None
    if compiled or required or extra is not True:

        def object_check(value: Any) -> bool:
            if not isinstance(value, dict):
                return True  # these keywords only apply to objects
            for key in required:
                if key not in value:
                    return False
            for key, item in value.items():
                check = compiled.get(key)
                if check is not None:
                    if not check(item):
                        return False
                elif extra_check is None or not extra_check(item):
                    return False
            return True

        checks.append(object_check)
    if "items" in schema:
        item_check = _compile(schema["items"], depth + 1)
        if item_check is None:
            return None

        def array_check(value: Any) -> bool:
            return not isinstance(value, list) or all(item_check(item) for item in value)

        checks.append(array_check)
    if len(checks) == 1:
        return checks[0]
    return lambda value: all(check(value) for check in checks)
