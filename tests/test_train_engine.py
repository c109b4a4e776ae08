"""DeepSpeed engine settings: LR schedule, config dict, precision, and that the schedule drives AdamW."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from model.engine import deepspeed_config, lr_multiplier, resolve_precision
from model.train import train_stage
from test_train_fakes import FAMILY, FakeScone, tiny_configs, write_dataset


def test_warmup_is_linear_to_the_peak():
    assert [lr_multiplier(s, steps=10, warmup_steps=4, schedule="constant") for s in range(6)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_the_peak_after_warmup():
    f = [lr_multiplier(s, steps=12, warmup_steps=4, schedule="cosine") for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[8] == pytest.approx(0.5)  # half way through the 8 decay steps
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a > b for a, b in zip(f[4:], f[5:]))
    assert f[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, steps=5, warmup_steps=0, schedule="cosine") == 1.0


def test_deepspeed_config_follows_train_params():
    _, train, _ = tiny_configs(micro_batch=3, grad_accum=2, grad_clip=0.5, zero_stage=3)
    cfg = deepspeed_config(train, world_size=2, precision="fp32")
    assert cfg["train_batch_size"] == 12
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] is False
    assert deepspeed_config(train, world_size=1, precision="bf16")["bf16"]["enabled"] is True


def test_auto_precision_is_fp32_on_cpu_and_explicit_choices_pass_through():
    assert resolve_precision("auto") == "fp32"  # this machine has no GPU
    assert resolve_precision("bf16") == "bf16"


def test_first_update_has_the_warmup_lr_as_its_size(tmp_path):
    # Adam's first step moves every weight with a non-zero gradient by exactly lr (m/sqrt(v) = sign(g)),
    # so the size of the update reads back the LR the scheduler gave the optimizer: peak / warmup_steps.
    write_dataset(tmp_path / "data", "fake", 16)
    stage, train, model_cfg = tiny_configs(steps=1, lr=0.1, warmup=4, schedule="cosine")
    train_stage("s", stage, train, model_cfg, tmp_path / "data", tmp_path / "out", progress=False,
                model_family=FAMILY)
    torch.manual_seed(train.seed)
    before = FakeScone().state_dict()
    after = load_file(tmp_path / "out" / "model.safetensors")
    step = torch.cat([(after[k] - before[k]).abs().flatten() for k in ("gen_in.weight", "gen_out.weight")])
    assert step.max().item() == pytest.approx(0.025, rel=1e-4)
    assert step.median().item() == pytest.approx(0.025, rel=1e-2)
    assert torch.equal(after["encoder.weight"], before["encoder.weight"])  # never trainable


def test_logged_lr_follows_warmup_then_cosine(tmp_path):
    write_dataset(tmp_path / "data", "fake", 16)
    stage, train, model_cfg = tiny_configs(steps=6, lr=0.01, warmup=2, schedule="cosine")
    train_stage("s", stage, train, model_cfg, tmp_path / "data", tmp_path / "out", progress=False,
                model_family=FAMILY)
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    expected = [0.005, 0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
