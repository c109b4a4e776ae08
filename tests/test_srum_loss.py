"""SRUM's objective (model.srum_loss) by hand: L_r, L_ref and their sum over velocities and targets eps - x0."""
import pytest
import torch

from model.scheduler import velocity_target
from model.srum_loss import reference_velocity_loss, reward_weighted_velocity_loss, reward_weights, srum_velocity_loss


def reward_weighted_loss(v, eps, x0, reward, **kw):
    return reward_weighted_velocity_loss(v, velocity_target(x0, eps), reward, **kw)


def reference_loss(v, eps, x0):
    return reference_velocity_loss(v, velocity_target(x0, eps))


def _case():
    # B=1, N=2 tokens, C=2 channels; target = eps - x0
    x0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    eps = torch.tensor([[[2.0, 1.0], [1.0, 1.0]]])  # target [[1, 1], [1, -1]]
    v = torch.tensor([[[3.0, 1.0], [1.0, 0.0]]])    # error  [[2, 0], [0, 1]] -> squared [[4, 0], [0, 1]]
    return v, eps, x0


def test_reward_weighted_loss_direct_by_hand():
    v, eps, x0 = _case()
    reward = torch.tensor([[0.25, 1.0]])
    # (0.25 * (4 + 0) + 1.0 * (0 + 1)) / 4 elements = 2 / 4
    assert reward_weighted_loss(v, eps, x0, reward).item() == pytest.approx(0.5)
    assert reward_weighted_loss(v, eps, x0, reward, alpha=2.0).item() == pytest.approx(1.0)


def test_reward_weighted_loss_signed_repels_below_neutral():
    v, eps, x0 = _case()
    reward = torch.tensor([[0.25, 1.0]])  # weights 2R - 1 = [-0.5, 1]
    # (-0.5 * 4 + 1 * 1) / 4
    assert reward_weighted_loss(v, eps, x0, reward, weighting="signed").item() == pytest.approx(-0.25)
    # neutral tokens carry no gradient under signed weighting
    v = v.clone().requires_grad_(True)
    reward_weighted_loss(v, eps, x0, torch.tensor([[0.5, 1.0]]), weighting="signed").backward()
    assert torch.all(v.grad[0, 0] == 0) and torch.any(v.grad[0, 1] != 0)


def test_reward_grid_is_flattened_row_major():
    v = torch.zeros(1, 4, 1)
    eps = torch.zeros(1, 4, 1)
    x0 = -torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])  # squared errors 1, 4, 9, 16 in token order
    grid = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])    # only token 0 (row 0, col 0)
    assert reward_weighted_loss(v, eps, x0, grid).item() == pytest.approx(1 / 4)
    grid = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])    # token 1 = row 0, col 1
    assert reward_weighted_loss(v, eps, x0, grid).item() == pytest.approx(4 / 4)


def test_reference_loss_and_total():
    v, eps, x0 = _case()
    assert reference_loss(v, eps, x0).item() == pytest.approx(5 / 4)
    target = velocity_target(x0, eps)
    out = srum_velocity_loss(v, target, torch.tensor([[0.25, 1.0]]), v, target, alpha=1.0, lambda_c=0.5)
    assert out["l_r"].item() == pytest.approx(0.5)
    assert out["l_ref"].item() == pytest.approx(1.25)
    assert out["loss"].item() == pytest.approx(0.5 + 0.5 * 1.25)


def test_full_reward_everywhere_equals_plain_flow_matching():
    g = torch.Generator().manual_seed(0)
    v, eps, x0 = (torch.randn(2, 6, 3, generator=g) for _ in range(3))
    ones = torch.ones(2, 6)
    assert reward_weighted_loss(v, eps, x0, ones).item() == pytest.approx(reference_loss(v, eps, x0).item())
    assert reward_weights(ones * 0.5, "signed").abs().sum() == 0


def test_shape_mismatch_and_unknown_weighting_are_errors():
    v, eps, x0 = _case()
    with pytest.raises(ValueError, match="to_latent_grid"):
        reward_weighted_loss(v, eps, x0, torch.ones(1, 3))
    with pytest.raises(ValueError, match="weighting"):
        reward_weighted_loss(v, eps, x0, torch.ones(1, 2), weighting="exp")
