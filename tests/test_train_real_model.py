"""The stage trainer with the real model family (a tiny BAGEL release) on subject-world data: Stage I, then Stage II
step 1 (bridge, understanding expert only) under ZeRO-3, through the launcher, as the pipeline runs them."""
import json
import shutil

import pytest
import torch

from data.build import build_dataset
from data.config import DataConfig
from model.bagel import family as fam
from model.bagel.release import load_release
from model.config import BridgeConfig, ModelConfig, StageConfig, TrainConfig
from model.launch import run_stage
from model.train import DEFAULT_FAMILY

BASE, MULTI = "scone_single_candidate_base", "scone_multi_candidate"


@pytest.fixture(scope="module")
def world(tmp_path_factory, bagel_release):
    root = tmp_path_factory.mktemp("data")
    cfg = DataConfig(root=str(root), sizes={"base": 12, "multi_candidate": 8})
    for name in (BASE, MULTI):
        build_dataset(name, cfg)
    model_cfg = ModelConfig(bridge=BridgeConfig(early_layer=1, apply_until=2))
    stages = {
        "stage1_step1": StageConfig(datasets=[BASE], steps=3, lr=1e-3, warmup_steps=1),
        "stage2_step1": StageConfig(datasets=[BASE, MULTI], init_from="stage1_step1", steps=2, lr=1e-3,
                                    train_generation=False, bridge=True),
    }
    train = TrainConfig(micro_batch=2, log_every=1, save_every=2, stages=stages)
    init = tmp_path_factory.mktemp("release") / "release"
    shutil.copytree(bagel_release, init)
    return root, model_cfg, train, init


def _weights(directory) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_release(directory).model.state_dict().items()}


def test_stage1_then_bridge_stage_with_the_bagel_family(world, tmp_path):
    root, model_cfg, train, init = world
    s1 = run_stage("stage1_step1", train.stages["stage1_step1"], train, model_cfg, root, tmp_path / "s1",
                   init_checkpoint=init, num_ranks=1, progress=False)  # the default family: BAGEL
    rows = [json.loads(ln) for ln in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["und_loss"] > 0 for r in rows)  # qa feeds the LM head
    assert s1["trainable_params"] < s1["total_params"]  # the ViT and the autoencoder are never trained
    assert json.loads((tmp_path / "s1" / "run_settings.json").read_text())["model_family"] == DEFAULT_FAMILY
    fam.tokenizer(tmp_path / "s1")  # a release again: its tokenizer travels with it

    s2 = run_stage("stage2_step1", train.stages["stage2_step1"], train.model_copy(update={"zero_stage": 3}),
                   model_cfg, root, tmp_path / "s2", init_checkpoint=tmp_path / "s1", num_ranks=1, progress=False)
    assert s2["zero_stage"] == 3 and s2["samples_seen"] == 2 * 2
    before, after = _weights(tmp_path / "s1"), _weights(tmp_path / "s2")
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape for k in before)
    und = {k for k in before if fam.expert_of(k) == "understanding"}
    frozen = set(before) - und
    assert any(k.startswith("vit_model.") for k in frozen) and any(fam.expert_of(k) == "generation" for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{k} changed although frozen"
    assert any(not torch.equal(before[k], after[k]) for k in und)
