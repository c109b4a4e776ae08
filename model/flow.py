"""Rectified flow (the generation objective): x_t = (1 - t) x0 + t eps, velocity target eps - x0.

t = 0 is the clean image, t = 1 pure noise. Sampling integrates the velocity from t = 1 down to t = 0.
The timestep shift s > 1 moves mass towards the noisy end, as SD3 / BAGEL do for larger images:
    shift(t) = s t / (1 + (s - 1) t)
"""
from __future__ import annotations

from typing import Literal

import torch

TimestepSampling = Literal["logit_normal", "uniform"]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    n: int,
    *,
    shift: float = 1.0,
    mode: TimestepSampling = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training timesteps in (0, 1), drawn on the generator's device, returned on `device`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if mode == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
    elif mode == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}; use 'logit_normal' or 'uniform'")
    return shift_timesteps(t, shift).to(device or gen_device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample timesteps t of shape [B] (broadcast over the remaining dims of x0)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between predicted and true velocity.

    `weight` (broadcastable to v_pred, e.g. a per-token reward map [B, L, 1]) turns it into a weighted mean
    over the same elements; without it this is the plain MSE of the paper.
    """
    err = (v_pred.float() - velocity_target(x0, noise).float()).pow(2)
    if weight is None:
        return err.mean()
    return (err * weight.float()).mean()


def sampling_timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 decreasing times from 1 (noise) to 0 (image), with the same shift as training."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)
