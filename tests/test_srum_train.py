import json

import numpy as np
import pytest
import torch

from model.batching import Example, collate
from model.config import BridgeConfig, ModelConfig, SrumConfig, TrainConfig
from model.modeling import SconeModel, save_checkpoint
from model.srum_train import (
    SrumCandidate,
    SrumLoss,
    _batch_order,
    _check_candidates,
    _torch_optimizers,
    set_adam_eps,
    srum_stage,
    srum_train_config,
    train_srum_round,
)
from model.tokenizer import build_tokenizer

CFG = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=16, vit_patch=8, latent_patch=4,
                  max_text_len=24, bridge=BridgeConfig(early_layer=0, apply_until=1))


def tiny_model(seed=0):
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = SconeModel.from_model_config(CFG, vocab_size=len(tok))
    # the velocity head starts at zero; give it weights so that gradients reach the whole generation expert
    torch.nn.init.normal_(model.velocity_head.weight, std=0.1)
    return model, tok


def candidates(n=3, seed=0):
    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    return [SrumCandidate(Example([], "a red circle at the beach"), img(), rng.random((4, 4)).astype(np.float32), img())
            for _ in range(n)]


def pair_batch(model, tok, cands):
    examples = [Example(c.example.refs, c.example.instruction, target=c.image) for c in cands]
    examples += [Example(c.example.refs, c.example.instruction, target=c.reference) for c in cands]
    return collate(examples, tok, model.config)


def test_stage_and_optimizer_settings_follow_the_srum_recipe():
    srum = SrumConfig(steps=7, lr=2.5e-5, warmup_steps=3)
    stage = srum_stage(srum)
    assert stage.schedule == "constant" and stage.lr == 2.5e-5 and stage.warmup_steps == 3 and stage.steps == 7
    assert stage.train_generation and not stage.train_understanding and stage.und_loss_weight == 0.0
    train = srum_train_config(srum, TrainConfig(zero_stage=1, precision="fp32", stages={"x": stage}))
    assert train.betas == (0.9, 0.95) and train.weight_decay == 0.0 and train.grad_clip == 1.0
    assert train.zero_stage == 1 and train.precision == "fp32" and train.micro_batch == srum.micro_batch


def test_adam_eps_reaches_the_torch_optimizer_inside_wrappers():
    p = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.AdamW([p], lr=1e-3)

    class ZeroLike:  # DeepSpeed's ZeRO optimizer keeps ours as `.optimizer`
        optimizer = inner

    class EngineLike:
        optimizer = ZeroLike()

    set_adam_eps(EngineLike(), 1e-15)
    assert _torch_optimizers(EngineLike.optimizer) == [inner] and inner.param_groups[0]["eps"] == 1e-15
    with pytest.raises(RuntimeError, match="eps"):
        set_adam_eps(type("E", (), {"optimizer": object()})(), 1e-15)


def test_batch_order_is_shuffled_epochs():
    order = _batch_order(5, 12, seed=3)
    assert len(order) == 12 and sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    np.testing.assert_array_equal(order, _batch_order(5, 12, seed=3))


def test_candidates_are_checked():
    with pytest.raises(ValueError, match="to_latent_grid"):
        _check_candidates([candidates(1)[0]._replace(reward=np.ones((16, 16)))], grid=4)
    with pytest.raises(ValueError, match="non-finite"):
        _check_candidates([candidates(1)[0]._replace(reward=np.full((4, 4), np.nan))], grid=4)
    with pytest.raises(ValueError, match="at least one"):
        _check_candidates([], grid=4)
    plain_tuple = tuple(candidates(1)[0])
    assert isinstance(_check_candidates([plain_tuple], grid=4)[0], SrumCandidate)


def test_srum_loss_module_is_linear_in_the_reward():
    model, tok = tiny_model()
    model.eval()  # no guidance dropout: identical draws for identical generator seeds
    cands = candidates(2)
    batch = pair_batch(model, tok, cands)
    module = SrumLoss(model, bridge=True, alpha=1.0, lambda_c=0.5, weighting="direct")

    def run(reward):
        return module(batch, torch.full((2, 4, 4), reward), generator=torch.Generator().manual_seed(7))

    full, half, zero = run(1.0), run(0.5), run(0.0)
    assert full["l_r"].item() > 0
    assert half["l_r"].item() == pytest.approx(full["l_r"].item() / 2, rel=1e-5)
    assert zero["l_r"].item() == 0.0
    assert zero["loss"].item() == pytest.approx(0.5 * zero["l_ref"].item())
    assert full["l_ref"].item() == pytest.approx(zero["l_ref"].item())  # the reward never touches L_ref
    with pytest.raises(ValueError, match="pairs"):
        module(batch, torch.ones(3, 4, 4))


def test_reward_map_steers_gradients_to_rewarded_tokens():
    model, tok = tiny_model()
    model.eval()
    batch = pair_batch(model, tok, candidates(1))
    module = SrumLoss(model, bridge=False, alpha=1.0, lambda_c=0.0, weighting="direct")
    # only the generated half's latents get a reward; a zero map gives no gradient at all
    zero = module(batch, torch.zeros(1, 4, 4), generator=torch.Generator().manual_seed(1))
    zero["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())
    model.zero_grad()
    one = module(batch, torch.ones(1, 4, 4), generator=torch.Generator().manual_seed(1))
    one["loss"].backward()
    assert model.velocity_head.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_train_srum_round_end_to_end(tmp_path, monkeypatch):
    import model.srum_train as srum_train

    model, tok = tiny_model()
    init = save_checkpoint(model, tok, tmp_path / "init")
    seen_eps = []
    original = srum_train.set_adam_eps

    def spy(eng, eps):
        original(eng, eps)
        seen_eps.extend(g["eps"] for opt in _torch_optimizers(eng.optimizer) for g in opt.param_groups)

    monkeypatch.setattr(srum_train, "set_adam_eps", spy)
    srum = SrumConfig(steps=4, micro_batch=2, warmup_steps=2, lr=1e-3)
    summary = train_srum_round(init, candidates(3), srum, CFG, tmp_path / "out")

    assert seen_eps and set(seen_eps) == {1e-15}
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # warm-up, then constant
    for r in rows:
        assert r["loss"] == pytest.approx(r["l_r"] + 0.5 * r["l_ref"], rel=1e-5)
    assert summary["steps"] == 4 and summary["precision"] == "fp32" and summary["adam_eps"] == 1e-15
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["final_loss"] == summary["final_loss"]

    trained = SconeModel.from_pretrained(tmp_path / "out")
    before, after = model.state_dict(), trained.state_dict()
    gen = {n for n, _ in model.named_parameters() if any(p is _ for p in model.expert_parameters("generation"))}
    und = {n for n, _ in model.named_parameters() if any(p is _ for p in model.expert_parameters("understanding"))}
    assert any(not torch.equal(before[n], after[n]) for n in gen)  # the generation expert learned
    assert all(torch.equal(before[n], after[n]) for n in und)  # the judge (understanding expert) did not move
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    with pytest.raises(ValueError, match="differs from the checkpoint"):
        train_srum_round(init, candidates(1), srum, CFG.model_copy(update={"hidden_size": 64, "num_heads": 2}),
                         tmp_path / "bad")
