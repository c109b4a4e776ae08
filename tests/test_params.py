"""params.yaml is validated by the packages' own models; errors name the key path and the reason."""
from pathlib import Path

import pytest

from flows.params import Params, ParamsError, load_params

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
