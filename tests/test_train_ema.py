"""model.ema: the weights average a release ships (BAGEL's ema.safetensors), in the stage trainer too."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from model.ema import WeightEMA
from model.train import train_stage
from test_train_fakes import FAMILY, FakeScone, tiny_configs, write_dataset


def test_average_follows_the_ramped_decay_exactly():
    p = nn.Parameter(torch.zeros(3))
    ema = WeightEMA([p], decay=0.9)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 4.0, -1.0, 3.0]):
        p.data.fill_(value)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25, ... then capped at 0.9
        expected = d * expected + (1 - d) * value
    torch.testing.assert_close(ema.shadow[0], expected)
    assert ema.current_decay() == pytest.approx(min(0.9, 6 / 15))


def test_swapped_in_shows_the_average_and_restores_the_weights():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = WeightEMA([p], decay=0.5)
    p.data.copy_(torch.tensor([5.0, 6.0]))
    ema.update()  # decay min(0.5, 1/10) = 0.1: 0.1 * [1, 2] + 0.9 * [5, 6]
    with ema.swapped_in():
        torch.testing.assert_close(p.data, torch.tensor([4.6, 5.6]))
    torch.testing.assert_close(p.data, torch.tensor([5.0, 6.0]))


def test_state_round_trips_and_a_foreign_state_is_refused(tmp_path):
    p = nn.Parameter(torch.randn(4))
    ema = WeightEMA([p], decay=0.99)
    for _ in range(3):
        p.data.add_(1.0)
        ema.update()
    ema.save(tmp_path / "ema.pt")
    other = WeightEMA([nn.Parameter(torch.zeros(4))], decay=0.99)
    other.load(tmp_path / "ema.pt")
    assert other.updates == 3 and torch.equal(other.shadow[0], ema.shadow[0])
    wrong = WeightEMA([nn.Parameter(torch.zeros(5))], decay=0.99)
    with pytest.raises(ValueError, match="does not match"):
        wrong.load(tmp_path / "ema.pt")


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA([nn.Parameter(torch.zeros(1))], decay=1.0)


@pytest.fixture
def data(tmp_path):
    write_dataset(tmp_path / "data", "fake", 24)
    return tmp_path / "data"


def _train(stage, train, model_cfg, data, out):
    return train_stage("s", stage, train, model_cfg, data, out, None, progress=False, model_family=FAMILY)


def test_stage_saves_the_average_and_leaves_frozen_weights_alone(data, tmp_path):
    stage, train, model_cfg = tiny_configs(steps=6, lr=1e-2)
    stage = stage.model_copy(update={"train_understanding": False})
    _train(stage, train, model_cfg, data, tmp_path / "last")
    _train(stage, train.model_copy(update={"ema_decay": 0.5}), model_cfg, data, tmp_path / "ema")
    last, ema = load_file(tmp_path / "last" / "model.safetensors"), load_file(tmp_path / "ema" / "model.safetensors")
    torch.manual_seed(train.seed)
    init = FakeScone().state_dict()
    assert torch.equal(ema["und_head.weight"], init["und_head.weight"])  # frozen: not averaged, not moved
    # trained: the average lies behind the last step's weights, between them and the start
    assert not torch.equal(ema["gen_out.weight"], last["gen_out.weight"])
    assert (ema["gen_out.weight"] - last["gen_out.weight"]).norm() < (init["gen_out.weight"] - last["gen_out.weight"]).norm()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resumed_run_saves_the_average_of_an_uninterrupted_run(data, tmp_path, monkeypatch, zero_stage):
    stage, train, model_cfg = tiny_configs(steps=8, lr=1e-2, save_every=3, zero_stage=zero_stage, ema_decay=0.9)
    _train(stage, train, model_cfg, data, tmp_path / "full")
    real_loss, calls = FakeScone.training_loss, {"n": 0}

    def crashing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:  # step 7: after the state saved at step 6
            raise RuntimeError("simulated crash")
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(FakeScone, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(stage, train, model_cfg, data, tmp_path / "resumed")
    monkeypatch.setattr(FakeScone, "training_loss", real_loss)
    assert _train(stage, train, model_cfg, data, tmp_path / "resumed")["resumed_from_step"] == 6
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
