"""params.yaml is validated by the packages' own models; errors name the key path and the reason."""
from pathlib import Path

import pytest

from tasks.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.pipeline.stage_order == list(p.train.stages)
    # Stage II step 1 trains the understanding expert only, with the bridge (Scone Sec. 3.4).
    s21 = p.train.stages["stage2_step1"]
    assert s21.bridge and s21.train_understanding and not s21.train_generation


def test_overrides_are_typed_and_nested():
    p = load_params(ROOT / "params.yaml", ["train.micro_batch=4", "model.bridge.tau=0.5", "eval.judge=openai"])
    assert p.train.micro_batch == 4 and p.model.bridge.tau == 0.5 and p.eval.judge == "openai"


@pytest.mark.parametrize(
    "override, where, why",
    [
        ("train.stages.stage1_step1.steps=0", "train.stages.stage1_step1.steps", "greater than or equal to 1"),
        ("eval.judge=gpt", "eval.judge", "oracle"),
        ("model.bridge.tau=high", "model.bridge.tau", "valid number"),
        ("data.typo_key=3", "data.typo_key", "Extra inputs"),
    ],
)
def test_invalid_values_name_the_key_path(override, where, why):
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", [override])
    assert where in str(e.value) and why in str(e.value)


def test_cross_field_rule_names_the_fix():
    with pytest.raises(ParamsError, match="early_layer < apply_until < num_layers"):
        load_params(ROOT / "params.yaml", ["model.bridge.apply_until=9"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="key.path=value"):
        load_params(ROOT / "params.yaml", ["train.micro_batch"])
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_the_flows_use_the_one_root_params():
    import flows.params
    import tasks.params

    assert flows.params.Params is Params and flows.params.load_params is load_params
    assert flows.params.ParamsError is tasks.params.ParamsError


def test_the_steps_and_benchmarks_annotate_their_params():
    """Every `params` argument of a step (tasks/) or a benchmark is typed with the root Params."""
    import ast

    loose = []
    for path in sorted([*(ROOT / "tasks").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                loose += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}" for a in node.args.args + node.args.kwonlyargs
                          if a.arg == "params" and not (isinstance(a.annotation, ast.Name) and a.annotation.id == "Params")]
    assert not loose, loose
