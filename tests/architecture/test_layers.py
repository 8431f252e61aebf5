"""The package layout's rules, checked on the source: layers, no cycles, modules import alone.

Layers (``shared/DESIGN.md``): ``gateway`` → ``executors`` → ``store``, nothing upward; inside
``gateway``: ``http`` → ``engine`` → ``protocol``; ``gateway.testing`` (demo model, test servers)
is never imported by product code except the demo command; nothing installed imports ``bench``;
nothing in ``store`` or ``executors`` imports starlette.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "executors", "store")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    result: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            result.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            result.add(target)
            for alias in node.names:  # ``from pkg import module``
                if f"{target}.{alias.name}" in MODULES:
                    result.add(f"{target}.{alias.name}")
    return result


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}

# Layer of each prefix: a module may import only from its own layer or a lower one.
LAYERS = [
    ("store", 0),
    ("executors", 1),
    ("gateway.errors", 2),
    ("gateway.protocol", 3),
    ("gateway.observe", 3),
    ("gateway.ui", 3),
    ("gateway.engine", 4),
    ("gateway.config", 4),
    ("gateway.http", 5),
    ("gateway.testing", 5),
    ("gateway.demo", 6),
    ("gateway.cli", 7),
    ("gateway", 7),
]


def _layer(name: str) -> int:
    for prefix, layer in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{name} has no layer")


def _ours(target: str) -> bool:
    return target.split(".")[0] in (*PACKAGES, "bench")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    for target in IMPORTS[name]:
        if not _ours(target) or target == "gateway":
            continue
        assert not target.startswith("bench"), f"{name} imports {target}: bench is not installed"
        assert _layer(target) <= _layer(name), f"{name} (layer {_layer(name)}) imports {target}"


@pytest.mark.parametrize("name", [n for n in sorted(MODULES) if n.startswith(("store", "executors"))])
def test_store_and_executors_know_nothing_of_http(name: str) -> None:
    for target in IMPORTS[name]:
        assert not target.startswith(("starlette", "gateway", "uvicorn")), f"{name} imports {target}"


def test_product_code_does_not_import_the_testing_package() -> None:
    allowed = {"gateway.demo", "gateway.cli"}
    for name, targets in IMPORTS.items():
        if name.startswith("gateway.testing") or name in allowed:
            continue
        for target in targets:
            assert not target.startswith("gateway.testing"), f"{name} imports {target}"


def test_no_import_cycles() -> None:
    graph = {n: {t for t in IMPORTS[n] if t in MODULES and t != n} for n in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                # a package's __init__ re-exporting its own submodules is not a cycle of concern
                if not all(c.startswith(cycle[0]) for c in cycle):
                    raise AssertionError("import cycle: " + " → ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in a fresh interpreter (a cycle or a missing import shows)."""
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('gateway','executors','store')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *sorted(MODULES)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
