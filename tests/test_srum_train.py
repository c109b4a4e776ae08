"""One SRUM round's trainer (model.srum_train): the recipe's settings, the optimiser's eps, the candidate order and
checks, and a round end to end on a tiny BAGEL release. The loss module's behaviour (linear in the reward, the map
steering the gradient) is tested on the BAGEL family in test_bagel_srum."""
import json

import numpy as np
import pytest
import torch

from model.bagel import family as fam
from model.bagel.release import load_release
from model.batching import Example
from model.config import ModelConfig, SrumConfig, TrainConfig
from model.srum_train import (
    SrumCandidate,
    _batch_order,
    _check_candidates,
    _torch_optimizers,
    load_round_model,
    set_adam_eps,
    srum_stage,
    srum_train_config,
    train_srum_round,
)


def candidates(n=3, seed=0, grid=(4, 4), side=16):
    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (side, side, 3), dtype=np.uint8)  # noqa: E731
    return [SrumCandidate(Example([], "a red circle at the beach"), img(), rng.random(grid).astype(np.float32), img())
            for _ in range(n)]


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


def test_a_checkpoint_that_is_not_a_release_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a BAGEL release directory"):
        load_round_model(tmp_path, SrumConfig(), None)


@pytest.mark.slow
def test_train_srum_round_end_to_end(bagel_release, tmp_path, monkeypatch):
    import model.srum_train as srum_train

    seen_eps = []
    original = srum_train.set_adam_eps

    def spy(eng, eps):
        original(eng, eps)
        seen_eps.extend(g["eps"] for opt in _torch_optimizers(eng.optimizer) for g in opt.param_groups)

    monkeypatch.setattr(srum_train, "set_adam_eps", spy)
    srum = SrumConfig(steps=4, micro_batch=2, warmup_steps=2, lr=1e-3)  # the bridge on, as the recipe's default
    cfg = ModelConfig()
    grid = load_round_model(bagel_release, srum, cfg).grid
    summary = train_srum_round(bagel_release, candidates(3, grid=grid, side=cfg.image_size), srum, cfg,
                               tmp_path / "out")

    assert seen_eps and set(seen_eps) == {1e-15}
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # warm-up, then constant
    for r in rows:
        assert r["loss"] == pytest.approx(r["l_r"] + 0.5 * r["l_ref"], rel=1e-5)
    assert summary["steps"] == 4 and summary["precision"] == "fp32" and summary["adam_eps"] == 1e-15
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["final_loss"] == summary["final_loss"]

    before = load_release(bagel_release).model.state_dict()
    after = load_release(tmp_path / "out").model.state_dict()  # strictly: a release again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(fam.expert_of(k) == "generation" for k in changed)  # the generation expert learned
    assert all(fam.expert_of(k) == "generation" for k in changed)  # the judge (understanding expert) did not move
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_the_candidates_file_gives_back_every_candidate_exactly(tmp_path):
    from model.srum_launch import load_candidates, save_candidates

    rng = np.random.default_rng(1)
    with_refs = SrumCandidate(Example([rng.integers(0, 256, (24, 16, 3), dtype=np.uint8),
                                       rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)], "the cat 🐈 from image 1"),
                              rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                              rng.random((4, 4)).astype(np.float32), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    cands = [*candidates(2), with_refs]
    back = load_candidates(save_candidates(cands, tmp_path / "c.npz"))
    assert len(back) == 3
    for a, b in zip(cands, back):
        assert a.example.instruction == b.example.instruction and len(a.example.refs) == len(b.example.refs)
        for x, y in zip((*a.example.refs, a.image, a.reward, a.reference), (*b.example.refs, b.image, b.reward,
                                                                              b.reference)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    with pytest.raises(FileNotFoundError, match="candidates file is missing"):
        load_candidates(tmp_path / "none.npz")


@pytest.mark.slow
def test_a_round_trains_on_two_torchrun_ranks_through_the_stage_launcher(bagel_release, tmp_path):
    from model.launch import TRAIN_WORKER
    from model.srum_launch import CANDIDATES, RUN_CONFIG, WORKER, launch_srum_round

    srum = SrumConfig(steps=3, micro_batch=1, warmup_steps=1, lr=1e-3, bridge=False)
    cfg = ModelConfig()
    grid = load_round_model(bagel_release, srum, cfg).grid
    train = TrainConfig(num_ranks=2, zero_stage=2, precision="fp32", stages={"srum": srum_stage(srum)})
    cands = candidates(4, grid=grid, side=cfg.image_size)
    summary = launch_srum_round(bagel_release, cands, srum, cfg, tmp_path / "ckpt", tmp_path / "round",
                                train=train)

    assert summary["num_ranks"] == 2 and summary["samples_seen"] == 3 * 2  # one candidate per rank per step
    a, b = summary["rank_weight_checksums"]
    assert a == b  # both ranks end on the same weights
    run_config = json.loads((tmp_path / "round" / RUN_CONFIG).read_text())
    assert run_config["worker"] == WORKER != TRAIN_WORKER and run_config["num_ranks"] == 2
    assert (tmp_path / "round" / CANDIDATES).is_file() and (tmp_path / "round" / "worker.log").is_file()
    before = load_release(bagel_release).model.state_dict()
    after = load_release(tmp_path / "ckpt").model.state_dict()  # rank 0 saved a release directory
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(fam.expert_of(k) == "generation" for k in changed)
