"""Handlers share one typed object: nothing in gateway/ reads or writes ``app.state.<name>``
besides ``app.state.gateway`` (set by the app's lifespan, read through ``gateway_state``)."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

GATEWAY = Path(gateway.__file__).resolve().parent


def _state_attributes(path: Path) -> set[str]:
    """Every ``<x>.app.state.<name>`` / ``app.state.<name>`` attribute name used in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "state"
            and (
                (isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "app")
                or (isinstance(node.value.value, ast.Name) and node.value.value.id == "app")
            )
        ):
            names.add(node.attr)
    return names


def test_app_state_holds_only_the_typed_gateway_state():
    used = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        if "testing" in path.relative_to(GATEWAY).parts:  # the scripted model's own app
            continue
        names = _state_attributes(path)
        if names:
            used[str(path.relative_to(GATEWAY))] = names
    assert used == {"http/app.py": {"gateway"}, "http/state.py": {"gateway"}}
