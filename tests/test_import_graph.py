"""Imports run one way: service -> workers -> tokencredit (the SDK), and no module imports itself back.

Read from the source (every import statement, those inside functions too), not from `sys.modules`: a lazy import
is still a dependency.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"service": ROOT / "service", "workers": ROOT / "workers", "tokencredit": ROOT / "client" / "tokencredit"}


def _modules() -> Dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imported_names(path: Path) -> List[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from a import b` imports the module a.b when there is one, else the name b of module a.
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import (the graph below assumes absolute imports)")
    return names


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in _imported_names(path):
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # Importing one's own package (`from tokencredit.bo import optimizer` inside tokencredit.bo) runs
            # nothing new: the package is being imported already.
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_sees_lazy_imports():
    # Guards the walker itself: service/cli.py imports the app inside a function.
    assert "service.main" in _graph()["service.cli"]


def test_no_module_under_workers_imports_service():
    offenders = [(m, t) for m, targets in _graph().items() if _package(m) == "workers"
                 for t in targets if _package(t) == "service"]
    # Also by name, for anything the walker would not resolve to a file (a module removed or renamed later).
    for path in PACKAGES["workers"].rglob("*.py"):
        offenders += [(str(path.relative_to(ROOT)), n) for n in _imported_names(path) if n.split(".")[0] == "service"]
    assert offenders == []


def test_the_sdk_imports_neither_workers_nor_service():
    offenders = [(m, t) for m, targets in _graph().items() if _package(m) == "tokencredit"
                 for t in targets if _package(t) != "tokencredit"]
    assert offenders == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
