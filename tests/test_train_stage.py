"""train_stage on one in-process rank with the fake model family: learning, freezing, resume, re-runs, ZeRO-3."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.train import RunSettingsMismatch, train_stage
from test_train_fakes import FAMILY, WIDE_FAMILY, FakeScone, tiny_configs, write_dataset


@pytest.fixture
def data(tmp_path):
    write_dataset(tmp_path / "data", "fake", 24)
    return tmp_path / "data"


def _train(stage, train, model_cfg, data, out, init=None, family=FAMILY):
    return train_stage("s", stage, train, model_cfg, data, out, init, progress=False, model_family=family)


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_outputs_are_written(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=60, lr=1e-2, micro_batch=8)
    out = tmp_path / "out"
    summary = _train(stage, train, model_cfg, data, out, family=WIDE_FAMILY)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = sum(r["loss"] for r in rows[:8]) / 8, sum(r["loss"] for r in rows[-8:]) / 8
    assert last < 0.8 * first  # measured: 1.30 -> 0.82
    assert summary["steps"] == 60 and summary["final_loss"] == rows[-1]["loss"]
    assert summary["samples_seen"] == 60 * 8 and summary["global_batch"] == 8
    assert summary["checkpoint"] == str(out)
    assert json.loads((out / "train_summary.json").read_text()) == summary
    assert all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 for r in rows)
    reloaded = FakeScone.from_pretrained(out)  # the HF-style checkpoint sits in out_dir itself
    assert (out / "tokenizer.json").exists()
    assert sum(p.numel() for p in reloaded.parameters()) == summary["total_params"]


def test_bridge_stage_trains_only_the_understanding_expert(data, tmp_path):
    # Stage II step 1: generation expert frozen, bridge on; initialised from the previous stage
    stage, train, model_cfg = tiny_configs(steps=3)
    _train(stage, train, model_cfg, data, tmp_path / "a")
    bridge = stage.model_copy(update={"train_generation": False, "bridge": True})
    summary = _train(bridge, train, model_cfg, data, tmp_path / "b", init=tmp_path / "a")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for k in ("encoder.weight", "encoder.bias", "gen_in.weight", "gen_in.bias", "gen_out.weight", "gen_out.bias"):
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["und_head.weight"], b["und_head.weight"])
    assert summary["trainable_params"] == 16 + 1  # und_head of hidden 16


def test_frozen_understanding_expert_stays_bit_identical(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=3)
    stage = stage.model_copy(update={"train_understanding": False})
    _train(stage, train, model_cfg, data, tmp_path / "out")
    torch.manual_seed(train.seed)
    init = FakeScone().state_dict()
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(init["und_head.weight"], after["und_head.weight"])
    assert not torch.equal(init["gen_out.weight"], after["gen_out.weight"])


def test_a_stage_training_nothing_is_refused(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=1)
    stage = stage.model_copy(update={"train_understanding": False, "train_generation": False})
    with pytest.raises(ValueError, match="trains no parameters"):
        _train(stage, train, model_cfg, data, tmp_path / "out")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_crashed_run_resumes_to_the_weights_of_an_uninterrupted_run(data, tmp_path, monkeypatch, zero_stage):
    stage, train, model_cfg = tiny_configs(steps=8, lr=1e-2, warmup=2, schedule="cosine",
                                           grad_accum=2, save_every=3, zero_stage=zero_stage)
    _train(stage, train, model_cfg, data, tmp_path / "full")

    calls = {"n": 0}
    real_loss = FakeScone.training_loss

    def crashing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * 6 + 2:  # second micro batch of step 7: after the state saved at step 6
            raise RuntimeError("simulated crash")
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(FakeScone, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(stage, train, model_cfg, data, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "train_summary.json").exists()
    monkeypatch.setattr(FakeScone, "training_loss", real_loss)

    summary = _train(stage, train, model_cfg, data, tmp_path / "resumed")
    assert summary["resumed_from_step"] == 6 and summary["steps_this_run"] == 2
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
    # metrics: each step once, and the recomputed steps match the uninterrupted run
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6)
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a])
    assert summary["samples_seen"] == 8 * 8
    assert [p.name for p in (tmp_path / "resumed" / "ds_state").iterdir() if p.is_dir()] == ["step0000006"]


def test_finished_run_is_a_no_op_and_other_settings_are_refused(data, tmp_path, monkeypatch):
    stage, train, model_cfg = tiny_configs(steps=2)
    out = tmp_path / "out"
    first = _train(stage, train, model_cfg, data, out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(FakeScone, "training_loss", lambda *a, **kw: pytest.fail("a finished stage trained again"))
    assert _train(stage, train, model_cfg, data, out) == first
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(RunSettingsMismatch, match=r"stage\.lr: 0\.03 -> 0\.01.*delete"):
        _train(stage.model_copy(update={"lr": 0.01}), train, model_cfg, data, out)


def test_retrained_previous_stage_makes_the_next_stage_stale(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=2)
    _train(stage, train, model_cfg, data, tmp_path / "a")
    _train(stage, train, model_cfg, data, tmp_path / "b", init=tmp_path / "a")
    # stage a trained again with another seed, same path: b's finished result no longer follows from it
    shutil.rmtree(tmp_path / "a")
    _train(stage, train.model_copy(update={"seed": 1}), model_cfg, data, tmp_path / "a")
    with pytest.raises(RunSettingsMismatch, match="init_weights"):
        _train(stage, train, model_cfg, data, tmp_path / "b", init=tmp_path / "a")


def test_missing_init_checkpoint_names_the_fix(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=1)
    with pytest.raises(FileNotFoundError, match="train the stage named in init_from first"):
        _train(stage, train, model_cfg, data, tmp_path / "out", init=tmp_path / "nothing")


def test_zero3_on_one_rank_matches_zero2(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=4, grad_accum=2)
    _train(stage, train, model_cfg, data, tmp_path / "z2")
    summary = _train(stage, train.model_copy(update={"zero_stage": 3}), model_cfg, data, tmp_path / "z3")
    assert summary["zero_stage"] == 3
    z2 = load_file(tmp_path / "z2" / "model.safetensors")
    z3 = load_file(tmp_path / "z3" / "model.safetensors")
    assert {k: v.shape for k, v in z3.items()} == {k: v.shape for k, v in z2.items()}
    for k in z2:
        torch.testing.assert_close(z3[k], z2[k], rtol=0, atol=1e-5)


def test_bf16_engine_trains_and_saves_fp32_weights(data, tmp_path):
    # the GPU precision path, exercised on DeepSpeed's CPU accelerator: bf16 weights and inputs in the engine
    stage, train, model_cfg = tiny_configs(steps=3)
    _train(stage, train, model_cfg, data, tmp_path / "fp32")
    summary = _train(stage, train.model_copy(update={"precision": "bf16"}), model_cfg, data, tmp_path / "bf16")
    assert summary["precision"] == "bf16"
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in bf16.values())
    # the same run up to bf16 rounding: the updates point the same way (Adam's near-sign steps can flip on
    # single weights with tiny gradients, so compare the whole update, not each element)
    torch.manual_seed(train.seed)
    init = FakeScone().state_dict()
    d32 = torch.cat([(fp32[k] - init[k]).flatten() for k in init])
    d16 = torch.cat([(bf16[k] - init[k]).flatten() for k in init])
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9
    assert abs(summary["final_loss"] - _metrics(tmp_path / "fp32")[-1]["loss"]) < 0.1
