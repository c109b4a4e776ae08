"""The project's import graph: every module imports, imports run one way between packages (data <- model <-
evaluation <- registry <- dashboards <- tasks <- flows, benchmarks above the library), no module takes part in an
import cycle (function-level imports included: a cycle hidden inside a function still ties two modules together),
and nothing installed reaches into tests/."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the installed packages (pyproject.toml), in import direction: each may import those before it
PACKAGES = ("data", "model", "evaluation", "registry", "dashboards", "tasks", "flows", "benchmarks")
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imported(path: Path) -> set[str]:
    """Every module name `path` imports anywhere in its body (absolute imports; the project uses no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for imported in _imported(path):
            if imported in MODULES:
                edges.add(imported)
            elif imported.rpartition(".")[0] in MODULES:  # `from a.b import name`: the module a.b
                edges.add(imported.rpartition(".")[0])
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_takes_part_in_an_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared piece into a module both import): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_imports_run_one_way_between_packages():
    rank = {p: i for i, p in enumerate(PACKAGES)}
    wrong = sorted(f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
                   if rank[d.split(".")[0]] > rank[m.split(".")[0]])
    assert not wrong, f"imports against the direction {' <- '.join(PACKAGES)}: {wrong}"


def test_nothing_below_the_benchmarks_imports_them():
    """benchmarks/ may import tasks/ and everything under it; the library, flows and dashboards never import it
    (flows/cli.py names the benchmark modules as strings and imports one when its command runs)."""
    graph = import_graph()
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.startswith("benchmarks")
                   for d in deps if d.split(".")[0] == "benchmarks")
    assert not wrong, wrong
    from flows.cli import BENCHMARKS

    assert all(module in MODULES and module.startswith("benchmarks.") for module in BENCHMARKS.values())


def test_nothing_installed_reaches_into_tests():
    wrong = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        wrong += [f"{name} imports {i}" for i in _imported(path) if i.split(".")[0] in TEST_MODULES | {"tests"}]
        wrong += [f"{name} names the tests folder" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value == "tests"]
    assert not wrong, wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package):
    for name in (m for m in MODULES if m.split(".")[0] == package):
        importlib.import_module(name)


def test_the_dashboards_read_the_registry_only_through_its_package():
    """The dashboards read MLflow (through mlflow's client) and the artifacts (through data.layout's map); of the
    registry they use the public vocabulary of `registry` itself (metric, tag and alias names, where the store is),
    never one of its modules nor a private name."""
    wrong = []
    for name, path in MODULES.items():
        if not name.startswith("dashboards"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "registry":
                if node.module != "registry":
                    wrong.append(f"{name} imports {node.module}")
                wrong += [f"{name} imports registry.{a.name}" for a in node.names
                          if a.name.startswith("_") or f"registry.{a.name}" in MODULES]
            elif isinstance(node, ast.Import):
                wrong += [f"{name} imports {a.name}" for a in node.names if a.name.startswith("registry.")]
    assert not wrong, wrong
