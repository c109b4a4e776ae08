"""Rectified-flow helpers and the frozen encoders (patch latent, random-feature ViT)."""
import numpy as np
import pytest
import torch

from model.flow import (
    add_noise,
    flow_matching_loss,
    sample_timesteps,
    sampling_timesteps,
    shift_timesteps,
    velocity_target,
)
from model.latent import FrozenViT, PatchLatent, patchify, to_uint8, to_unit


def test_shift_formula_by_hand():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # s t / (1 + (s - 1) t) with s = 3: 0.75 / 1.5 = 0.5, 1.5 / 2 = 0.75
    assert torch.allclose(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)
    with pytest.raises(ValueError):
        shift_timesteps(t, 0.0)


def test_sample_timesteps_range_and_determinism():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_timesteps(4000, shift=1.0, mode="logit_normal", generator=g1)
    b = sample_timesteps(4000, shift=1.0, mode="logit_normal", generator=g2)
    assert torch.equal(a, b) and bool(((a > 0) & (a < 1)).all())
    assert abs(float(a.median()) - 0.5) < 0.03  # logit-normal(0, 1) is symmetric around 1/2
    shifted = sample_timesteps(4000, shift=3.0, mode="uniform", generator=torch.Generator().manual_seed(0))
    assert float(shifted.mean()) > 0.6  # shift > 1 moves mass towards noise
    with pytest.raises(ValueError):
        sample_timesteps(3, mode="beta")


def test_noising_velocity_and_loss_by_hand():
    x0 = torch.tensor([[1.0, -1.0]])
    eps = torch.tensor([[0.0, 1.0]])
    assert torch.equal(add_noise(x0, eps, torch.tensor([0.0])), x0)
    assert torch.equal(add_noise(x0, eps, torch.tensor([1.0])), eps)
    assert torch.allclose(add_noise(x0, eps, torch.tensor([0.25])), torch.tensor([[0.75, -0.5]]))
    assert torch.equal(velocity_target(x0, eps), torch.tensor([[-1.0, 2.0]]))
    # errors (0 - (-1))^2 = 1 and (0 - 2)^2 = 4
    assert flow_matching_loss(torch.zeros(1, 2), x0, eps).item() == pytest.approx(2.5)
    assert flow_matching_loss(torch.zeros(1, 2), x0, eps, weight=torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)


def test_sampling_timesteps():
    ts = sampling_timesteps(4, shift=2.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and len(ts) == 5
    assert bool((ts[1:] < ts[:-1]).all())
    assert ts[2].item() == pytest.approx(2 * 0.5 / 1.5)


def test_patch_latent_is_exactly_invertible():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    lat = PatchLatent(32, 4)
    x = to_unit(torch.from_numpy(imgs))
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    tokens = lat.encode(x)
    assert tokens.shape == (2, 64, 48)
    # token 1 is the patch at row 0, columns 4..7; channel order (colour, row, column)
    expect = x[0, :, 0:4, 4:8].reshape(-1)
    assert torch.equal(tokens[0, 1], expect)
    assert np.array_equal(to_uint8(lat.decode(tokens)), imgs)
    assert torch.equal(patchify(x, 4), tokens)


def test_frozen_vit_is_a_fixed_function_of_its_seed():
    a, b, c = FrozenViT(32, 8, 16, seed=0), FrozenViT(32, 8, 16, seed=0), FrozenViT(32, 8, 16, seed=1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    fa = a(x)
    assert fa.shape == (3, 16, 16)
    assert torch.equal(fa, b(x)) and not torch.allclose(fa, c(x))
    assert torch.allclose(fa.mean(-1), torch.zeros(3, 16), atol=1e-5)  # LayerNorm without affine
    assert not any(p.requires_grad for p in a.parameters())
