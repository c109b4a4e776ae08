"""The flow scheduler (model.scheduler): timesteps and their shift, noise, the objective, guidance dropout and
guidance, by hand."""
import numpy as np
import pytest
import torch

from model.scheduler import (
    add_noise,
    case_noise,
    flow_matching_loss,
    guidance_dropout,
    guidance_passes,
    guided_velocity,
    sample_timesteps,
    sampling_timesteps,
    shift_timesteps,
    training_noise,
    velocity_target,
)


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


def test_sampling_timesteps():
    ts = sampling_timesteps(4, shift=2.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and len(ts) == 5
    assert bool((ts[1:] < ts[:-1]).all())
    assert ts[2].item() == pytest.approx(2 * 0.5 / 1.5)
    with pytest.raises(ValueError, match="at least 1 step"):
        sampling_timesteps(0)


def test_noising_velocity_and_loss_by_hand():
    x0 = torch.tensor([[1.0, -1.0]])
    eps = torch.tensor([[0.0, 1.0]])
    assert torch.equal(add_noise(x0, eps, torch.tensor([0.0])), x0)
    assert torch.equal(add_noise(x0, eps, torch.tensor([1.0])), eps)
    assert torch.allclose(add_noise(x0, eps, torch.tensor([0.25])), torch.tensor([[0.75, -0.5]]))
    v = velocity_target(x0, eps)
    assert torch.equal(v, torch.tensor([[-1.0, 2.0]]))
    # errors (0 - (-1))^2 = 1 and (0 - 2)^2 = 4
    assert flow_matching_loss(torch.zeros(1, 2), v).item() == pytest.approx(2.5)
    assert flow_matching_loss(torch.zeros(1, 2), v, weight=torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)
    half = flow_matching_loss(torch.zeros(1, 2, dtype=torch.bfloat16), v.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(2.5)


def test_per_sample_timesteps_broadcast_over_tokens_and_channels():
    x0, eps = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    x_t = add_noise(x0, eps, torch.tensor([0.25, 0.75]))
    assert torch.equal(x_t[0], torch.full((3, 4), 0.25)) and torch.equal(x_t[1], torch.full((3, 4), 0.75))


def test_training_noise_is_the_generators_and_lands_where_asked():
    a = training_noise((2, 3), torch.Generator().manual_seed(5), "cpu", torch.bfloat16)
    b = torch.randn((2, 3), generator=torch.Generator().manual_seed(5)).bfloat16()
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_case_noise_is_keyed_by_seed_and_position_only():
    a = case_noise(7, 2, (4, 3))
    assert a.shape == (4, 3) and a.dtype == torch.float32
    assert torch.equal(a, case_noise(7, 2, (4, 3)))
    assert not torch.allclose(a, case_noise(7, 3, (4, 3))) and not torch.allclose(a, case_noise(8, 2, (4, 3)))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    case_noise(7, 2, (4, 3))
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone


def test_guidance_combination_by_hand():
    assert guidance_passes(1.0, 1.0) == ("full",)
    assert guidance_passes(3.0, 1.0) == ("full", "image")
    assert guidance_passes(3.0, 1.5) == ("full", "image", "none")
    assert guidance_passes(1.0, 1.5) == ("full", "image", "none")
    full, image, none = torch.full((1, 2), 4.0), torch.full((1, 2), 2.0), torch.full((1, 2), 1.0)
    v = torch.cat([full, image, none])
    # none + s_I (image - none) + s_T (full - image) = 1 + 1.5 * 1 + 3 * 2
    assert torch.allclose(guided_velocity(v, ("full", "image", "none"), 3.0, 1.5), torch.full((1, 2), 8.5))
    # image + s_T (full - image) = 2 + 3 * 2
    assert torch.allclose(guided_velocity(v[:2], ("full", "image"), 3.0, 1.0), torch.full((1, 2), 8.0))
    assert torch.equal(guided_velocity(full, ("full",), 1.0, 1.0), full)
    with pytest.raises(ValueError, match="guidance_passes"):
        guided_velocity(v[:2], ("image", "none"), 3.0, 1.5)


def test_guidance_with_unit_scales_is_the_full_pass():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, 2, generator=g)
    torch.testing.assert_close(guided_velocity(v, ("full", "image", "none"), 1.0, 1.0), v[0:1], rtol=0, atol=1e-6)


def test_guidance_dropout_follows_its_probabilities():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # the two conditions the sampler removes: (-, -) drops references and instruction, (I, -) the instruction
    assert guidance_dropout(4, 1.0, 0.0, gen()) == ([True] * 4, [True] * 4)
    assert guidance_dropout(4, 0.0, 1.0, gen()) == ([False] * 4, [True] * 4)
    assert guidance_dropout(4, 0.0, 0.0, gen()) == ([False] * 4, [False] * 4)
    assert guidance_dropout(0, 0.5, 0.5, gen()) == ([], [])
    image, text = guidance_dropout(4000, 0.25, 0.5, gen())
    assert abs(np.mean(image) - 0.25) < 0.03
    assert abs(np.mean(text) - (0.25 + 0.75 * 0.5)) < 0.03  # every image drop is a text drop too
    assert all(t for i, t in zip(image, text) if i)  # never references gone with the instruction kept


def test_guidance_dropout_off_draws_nothing():
    g = torch.Generator().manual_seed(1)
    guidance_dropout(8, 0.0, 0.0, g)
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(1)
    guidance_dropout(8, 0.1, 0.0, g)
    assert not torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(1)))
