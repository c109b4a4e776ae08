"""The stage trainer with the real Scone model and subject-world data (tiny dims): Stage I then Stage II step 1."""
import json

import pytest
import torch
from safetensors.torch import load_file

from data.build import build_dataset
from data.config import DataConfig
from model.config import BridgeConfig, ModelConfig, StageConfig, TrainConfig
from model.launch import run_stage
from model.modeling import SconeModel, load_checkpoint

BASE, MULTI = "scone_single_candidate_base", "scone_multi_candidate"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = DataConfig(root=str(root), sizes={"base": 12, "multi_candidate": 8})
    for name in (BASE, MULTI):
        build_dataset(name, cfg)
    # 32-pixel data, 16-pixel model: collate resizes, as it does for real data
    model_cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=16, vit_patch=8, latent_patch=4,
                            bridge=BridgeConfig(early_layer=0, apply_until=1))
    stages = {
        "stage1_step1": StageConfig(datasets=[BASE], steps=3, lr=1e-3, warmup_steps=1),
        "stage2_step1": StageConfig(datasets=[BASE, MULTI], init_from="stage1_step1", steps=2, lr=1e-3,
                                    train_generation=False, bridge=True),
    }
    train = TrainConfig(micro_batch=2, log_every=1, save_every=2, stages=stages)
    return root, model_cfg, train


def _names(model: SconeModel, expert: str) -> set[str]:
    ids = {id(p) for p in model.expert_parameters(expert)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_stage1_then_bridge_stage_with_the_scone_model(world, tmp_path):
    root, model_cfg, train = world
    s1 = run_stage("stage1_step1", train.stages["stage1_step1"], train, model_cfg, root, tmp_path / "s1",
                   num_ranks=1, progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["und_loss"] > 0 for r in rows)  # qa feeds the LM head
    assert s1["trainable_params"] < s1["total_params"]  # the ViT is never trained
    model, tokenizer = load_checkpoint(tmp_path / "s1")
    assert model.config.hidden_size == 32 and len(tokenizer) == model.config.vocab_size

    s2 = run_stage("stage2_step1", train.stages["stage2_step1"], train.model_copy(update={"zero_stage": 3}),
                   model_cfg, root, tmp_path / "s2", init_checkpoint=tmp_path / "s1", num_ranks=1, progress=False)
    assert s2["zero_stage"] == 3 and s2["samples_seen"] == 2 * 2
    before = load_file(tmp_path / "s1" / "model.safetensors")
    after = load_file(tmp_path / "s2" / "model.safetensors")
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape for k in before)
    gen, und = _names(model, "generation"), _names(model, "understanding")
    frozen = set(before) - und
    assert gen <= frozen and any(k.startswith("vit.") for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{k} changed although frozen"
    assert any(not torch.equal(before[k], after[k]) for k in und & set(before))
    SconeModel.from_pretrained(str(tmp_path / "s2"))
