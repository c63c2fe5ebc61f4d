"""The dependency direction of ../shared/STYLE.md, checked on every module of the package.

Every module imports; its imports (module level and inside functions, type-checking-only
ones aside) form a graph with no cycle; Airflow is imported by the orchestration layer only
(and by the SSH transport's connection lookup, which reads Airflow's connections): never by
the job (``train/``), telemetry, analysis, backends or setup code.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "charllm"
NO_AIRFLOW = ("charllm.train", "charllm.telemetry", "charllm.analysis", "charllm.backends", "charllm.setup")
# the orchestration layer; the SSH transport's connection lookup
AIRFLOW_ALLOWED = ("charllm.orchestrate", "charllm.transport.ssh")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports anywhere in its code, except under ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                found.add(module)
                found.update(f"{module}.{a.name}" for a in child.names if f"{module}.{a.name}" in MODULES)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles() -> None:
    internal = {m: {i for i in deps if i in MODULES and i != m} for m, deps in GRAPH.items()}
    print(f"{len(internal)} modules, {sum(map(len, internal.values()))} internal imports")
    assert cycles(internal) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: the envsetup <-> runner pair it replaced is a cycle to it."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_orchestration_layer_imports_airflow() -> None:
    users = sorted(m for m, deps in GRAPH.items() if any(d == "airflow" or d.startswith("airflow.") for d in deps))
    print("modules importing airflow:", users)
    assert not [m for m in users if m.startswith(NO_AIRFLOW)]
    assert all(m.startswith(AIRFLOW_ALLOWED) for m in users), users


def test_the_definitions_and_the_job_package_import_no_heavy_library() -> None:
    """What the job and the aggregation share is importable anywhere (no torch, pandas, numpy)."""
    heavy = ("torch", "pandas", "numpy", "matplotlib", "airflow")
    for name in ("charllm.definitions", "charllm.outcomes", "charllm.train", "charllm.backends.base"):
        assert not [d for d in GRAPH[name] if d.split(".")[0] in heavy], name


def test_every_module_imports() -> None:
    failed = {}
    for name in sorted(MODULES):
        try:
            importlib.import_module(name)
        except Exception as err:  # collected, so that one report names every module that fails
            failed[name] = repr(err)
    print(f"imported {len(MODULES)} modules")
    assert failed == {}
