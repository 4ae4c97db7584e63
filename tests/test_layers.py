"""The package's layering (docs/architecture.md): no import circle, and no import that runs up a layer.

Imports are read from the source with ``ast``, including the ones inside functions (a lazy import
is still a dependency); imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so those count as imported too.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowshot"

# Most specific prefix wins. Layer numbers as in docs/architecture.md.
LAYERS: dict[str, int] = {
    "lowshot": 0, "lowshot.errors": 0, "lowshot.registry": 0, "lowshot.utils": 0, "lowshot.fileio": 0,
    "lowshot.config": 1, "lowshot.checkpoint": 1, "lowshot.feature_cache": 1, "lowshot.rundir": 1,
    "lowshot.tblog": 1, "lowshot.distributed": 1, "lowshot.results": 1,
    "lowshot.data": 2, "lowshot.backbones": 2, "lowshot.heads": 2, "lowshot.models": 2,
    # the few-shot core: pure-tensor episodes and batched evaluators (training-time validation uses it)
    "lowshot.fewshot": 2,
    "lowshot.train": 3, "lowshot.training": 3, "lowshot.inference": 3,
    "lowshot.embed": 4, "lowshot.fewshot.protocol": 4, "lowshot.fewshot.feature_files": 4,
    "lowshot.fewshot.generalized": 4, "lowshot.longtail": 4, "lowshot.analysis": 4,
    "lowshot.report": 5,
    "lowshot.cli": 6, "lowshot.__main__": 6, "lowshot.argtypes": 6, "lowshot.demo": 6, "lowshot.pipelines": 6,
    "lowshot.fewshot.cli": 6, "lowshot.longtail.cli": 6, "lowshot.analysis.cli": 6, "lowshot.report.cli": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    assert "lowshot.train" in out, f"no lowshot sources under {SRC}"
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lowshot module ``name`` imports (targets resolved to the module, plus parent packages)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_the_checker_sees_function_local_imports_and_ignores_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "lowshot"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n"
                              "from .a import f\n")
    (pkg / "c.py").write_text("")
    modules = {"lowshot": pkg / "__init__.py", "lowshot.a": pkg / "a.py", "lowshot.b": pkg / "b.py",
               "lowshot.c": pkg / "c.py"}
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    assert graph["lowshot.a"] == {"lowshot.b"} and graph["lowshot.b"] == {"lowshot.a"}
    assert _cycles(graph) == [["lowshot.a", "lowshot.b"]]


def test_no_import_circle() -> None:
    assert _cycles(_graph()) == []


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        layer_of(module)


def test_no_import_runs_up_a_layer() -> None:
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in _graph().items() for b in targets if layer_of(b) > layer_of(a))
    assert upward == [], "\n".join(upward)


@pytest.mark.parametrize("package", ["lowshot.data", "lowshot.heads", "lowshot.backbones"])
def test_components_never_read_the_config(package: str) -> None:
    """Layer-2 components take explicit arguments; only the layers above build them from a Config."""
    graph = _graph()
    readers = sorted(m for m in graph if (m == package or m.startswith(package + ".")) and "lowshot.config" in graph[m])
    assert readers == []
