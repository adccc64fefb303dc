"""The architecture holds: no import cycles among rpat's modules, imports at module top, one home per fact.

The layers themselves (data -> models -> attacks -> objectives -> config -> evaluation -> training ->
reports -> experiments -> cli) are checked by import-linter in CI (``lint-imports``, the contract in
pyproject.toml); this file checks what that contract cannot see: cycles inside a layer, and imports
hidden inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rpat"
#: Optional or heavy third-party packages that may be imported inside a function (only where used); a dotted
#: entry (``torch.utils.tensorboard``, which needs the optional tensorboard package) allows that module only.
LAZY_OK = {"art", "matplotlib", "pyautoattack", "sklearn", "safetensors", "submitit",
           "torch.utils.tensorboard"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _targets(mod: str, node: ast.AST, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        return [target] + [f"{target}.{a.name}" for a in node.names]
    return [a.name for a in node.names]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Import edges between rpat modules (every import statement: top-level, in functions, under
    TYPE_CHECKING), and the function-level imports as ``(module, line, imported)``."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    nested: list[tuple[str, int, str]] = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _targets(m, node, p.name == "__init__.py")
            edges[m] |= {t for t in targets if t in mods and t != m}
            if id(node) not in top:
                nested.append((m, node.lineno, targets[0]))
    return edges, nested


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_takes_part_in_an_import_cycle():
    edges, _ = _graph()
    assert len(edges) > 50  # the walk found the package
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_inside_functions_are_only_optional_heavy_packages():
    _, nested = _graph()
    bad = [(m, line, t) for m, line, t in nested if t.split(".")[0] not in LAZY_OK and t not in LAZY_OK]
    assert bad == []


@pytest.mark.parametrize("fact, pattern", [
    ("the AutoAttack version names", '("standard", "apgd"'),
    ("an atomic rename", "os.replace("),
])
def test_one_fact_one_place(fact, pattern):
    homes = [p.relative_to(SRC) for p in SRC.rglob("*.py") if pattern in p.read_text()]
    assert len(homes) == 1, f"{fact} is written in {homes}"
