"""A stage continuing from a checkpoint follows params.yaml's runtime settings, never a different architecture."""
import pytest

from model.config import ModelConfig
from model.modeling import SconeConfig


def test_runtime_settings_follow_params_and_architecture_is_kept():
    ckpt = SconeConfig.from_model_config(ModelConfig(), vocab_size=80)
    params = ModelConfig(bridge={"early_layer": 0, "apply_until": 3, "tau": 0.02}, cfg_drop_text=0.2)
    new = ckpt.with_runtime_settings(params)
    assert (new.bridge_tau, new.bridge_early_layer, new.bridge_apply_until) == (0.02, 0, 3)
    assert new.cfg_drop_text == 0.2 and new.vocab_size == 80 and new.hidden_size == ckpt.hidden_size


def test_architecture_mismatch_names_the_fields():
    ckpt = SconeConfig.from_model_config(ModelConfig(), vocab_size=80)
    with pytest.raises(ValueError, match=r"hidden_size: checkpoint 128 vs params 64.*prediction"):
        ckpt.with_runtime_settings(ModelConfig(hidden_size=64, prediction="velocity"))
