"""dvc.yaml names, for every stage, all the project code its step imports: otherwise a code change would leave
stale outputs that DVC (the one authority for "up to date") calls fresh."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "model", "evaluation", "registry", "tasks", "dashboards", "flows")
# The step each stage's command runs (flows/cli.py dispatches to these; the CLI itself only parses arguments).
STEP_OF_COMMAND = {
    "scone data build": "tasks.datasets",
    "scone data validate": "tasks.datasets",
    "scone bootstrap": "tasks.bootstrap",
    "scone train": "tasks.train_stage",
    "scone srum round": "tasks.srum",
    "scone eval checkpoint": "tasks.evaluate",
    "scone register": "tasks.register",
    "scone report": "tasks.report",
}


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes inside `if TYPE_CHECKING:` blocks: imports for annotations (the steps' `params: Params`), never run,
    so no output goes stale when they change."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            found |= {n for stmt in node.body for n in ast.walk(stmt)}
    return found


def _imports(path: Path) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if node in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[Path]:
    """Project source files `module` imports, directly or not (function-level imports included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run their __init__
        todo += sorted(_imports(path))
    return {p.relative_to(ROOT) for p in seen}


def _stages() -> list[tuple[str, dict]]:
    """(name, stage) for every stage, foreach templates included (their code deps do not vary per item)."""
    out = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        out.append((name, stage.get("do", stage)))
    return out


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("name,stage", _stages(), ids=[n for n, _ in _stages()])
def test_stage_deps_cover_the_code_its_step_imports(name, stage):
    command = next(c for c in STEP_OF_COMMAND if stage["cmd"].startswith(c))
    code = import_closure(STEP_OF_COMMAND[command])
    deps = [d for d in stage["deps"] if not d.startswith("artifacts") and "$" not in d]
    # an empty package __init__ holds no behaviour to go stale
    missing = sorted(str(p) for p in code if not _covered(p, deps) and (ROOT / p).read_text().strip())
    assert not missing, f"dvc.yaml stage {name}: its step imports {missing}; add them (or their folder) to deps"


def test_the_closure_follows_function_level_imports():
    # tasks.evaluate imports evaluation.runner inside its function; the sampler comes in through it
    code = import_closure("tasks.evaluate")
    assert Path("evaluation/runner.py") in code and Path("model/bagel/generate.py") in code
    # it logs to the checkpoint's MLflow run, but the gate and the model registry are not its code
    assert Path("registry/tracking.py") in code
    assert not ({Path("registry/gate.py"), Path("registry/models.py")} & code)
    assert not any(p.parts[0] == "dashboards" for p in code)


def test_training_does_not_depend_on_evaluation_code():
    """So an edit to a score formula re-scores checkpoints without retraining them."""
    train = dict(_stages())["train"]
    assert not any(d.startswith("evaluation") for d in train["deps"])
    assert not any(p.parts[0] == "evaluation" for p in import_closure("tasks.train_stage"))
