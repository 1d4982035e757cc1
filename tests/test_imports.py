"""The import graph of the project: layers import one way, and no module imports itself back.

Layers, from the ground up: data_prep (no training code) -> models -> megatron_ext (the runtime)
-> posttrain (stages) -> tools, slurm (command lines). Every `import` counts, also those inside
functions (a lazy import is still a dependency), except those under `if TYPE_CHECKING:`, which
only name types for annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"data_prep": 0, "models": 1, "megatron_ext": 2, "posttrain": 3, "tools": 4, "slurm": 4}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> Dict[str, Path]:
    return {_module_name(p): p for top in LAYERS for p in (REPO / top).rglob("*.py")}


def _resolve(name: str, modules: Dict[str, Path]) -> str | None:
    """The project module `name` refers to (a module, or the package holding a name), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The project modules `module` imports (anywhere in the file)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> Dict[str, Set[str]]:
    modules = _project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_imports_run_from_the_ground_up():
    wrong = [f"{m} imports {t}" for m, targets in graph().items() for t in sorted(targets)
             if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One cycle of the graph (as a path that returns to its start), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_module_imports_itself_back():
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph().items()}
    cycle = _cycle(edges)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_a_cycle_and_a_wrong_way_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
    modules = _project_modules()
    assert "megatron_ext.stages" in graph()["megatron_ext.loop"] or "megatron_ext.schedule" in graph()["megatron_ext.loop"]
    assert imports_of("megatron_ext.x", REPO / "megatron_ext" / "loop.py", modules) >= {"megatron_ext.callbacks"}
