"""The flow scheduler: what rectified flow does to time, noise and conditions, for training and sampling alike.

Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0. t = 0 is the clean image, t = 1 pure noise;
sampling integrates the velocity from t = 1 down to t = 0. The timestep shift s > 1 moves mass towards the noisy
end, as SD3 / BAGEL do for larger images:

    shift(t) = s t / (1 + (s - 1) t)

Training and sampling share the shift (`sample_timesteps`, `sampling_timesteps`) and the conditions: training
drops the references or the instruction (`guidance_dropout`), so that sampling can ask for the unconditional
branches of classifier-free guidance. Guidance follows InstructPix2Pix, with the references as the image condition
I and the instruction as the text condition T, from three passes: full (I, T), references only (I, -) and nothing
(-, -):

    v = v(-, -) + s_I [v(I, -) - v(-, -)] + s_T [v(I, T) - v(I, -)]

s_I = s_T = 1 reduces to the full pass alone, s_I = 1 to two passes (`guidance_passes`); `guided_velocity`
combines what the passes returned.

Randomness: training draws t, the noise and the dropout from the generator the stage trainer seeds per micro batch
(model.training.noise_seed); sampling draws each case's starting noise from (seed, position of the case), so an image
does not depend on which other cases share its batch (`case_noise`).

The model computes velocities (model.bagel.family for training, model.bagel.generate for sampling); nothing here
knows its layout.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

TimestepSampling = Literal["logit_normal", "uniform"]
GuidancePass = Literal["full", "image", "none"]


# ---------------------------------------------------------------------------------------------------------------
# time


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_timesteps(
    n: int,
    *,
    shift: float = 1.0,
    mode: TimestepSampling = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training timesteps in (0, 1), drawn on the generator's device, returned on `device`."""
    gen_device = _generator_device(generator)
    if mode == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
    elif mode == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}; use 'logit_normal' or 'uniform'")
    return shift_timesteps(t, shift).to(device or gen_device)


def sampling_timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 decreasing times from 1 (noise) to 0 (image), with the same shift as training."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


# ---------------------------------------------------------------------------------------------------------------
# noise and the objective


def training_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
                   dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a seed gives the same draws wherever the model
    runs), returned on `device` in `dtype`."""
    return torch.randn(shape, generator=generator, device=_generator_device(generator)).to(device, dtype)


def case_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise (t = 1) of the case at position `index` of a sampling call with `seed` (float32, CPU)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state) & (2**63 - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample timesteps t of shape [B] (broadcast over the remaining dims of x0)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(v_pred: torch.Tensor, v_target: torch.Tensor, weight: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Mean squared error between predicted and target velocity, in float32 whatever the inputs' dtype.

    `weight` (broadcastable to v_pred, e.g. a per-token reward map [B, L, 1]) turns it into a weighted mean over
    the same elements; without it this is the plain MSE of the paper."""
    err = (v_pred.float() - v_target.float()).pow(2)
    if weight is None:
        return err.mean()
    return (err * weight.float()).mean()


# ---------------------------------------------------------------------------------------------------------------
# guidance


def guidance_dropout(n: int, p_image: float, p_text: float, generator: torch.Generator | None
                     ) -> tuple[list[bool], list[bool]]:
    """(drop_image, drop_text) per training sample, the two conditions the sampler's guidance removes: with
    probability p_image the sample loses its references AND its instruction (the (-, -) pass of image guidance),
    else with p_text its instruction only (the (I, -) pass). Dropping the references alone would train a
    condition no sampling pass asks for and leave (-, -) untrained. Nothing is drawn when neither can happen, so
    the draws that follow (t, noise) stay the same whether dropout is configured off or not reached."""
    if n == 0 or (p_image <= 0 and p_text <= 0):
        return [False] * n, [False] * n
    u = torch.rand(n, 2, generator=generator, device=_generator_device(generator)).cpu()
    drop_image = [bool(x < p_image) for x in u[:, 0]]
    drop_text = [bool(di or x < p_text) for di, x in zip(drop_image, u[:, 1])]
    return drop_image, drop_text


def guidance_passes(cfg_text: float, cfg_image: float) -> tuple[GuidancePass, ...]:
    """The conditions a sampling step needs: (I, T) always, (I, -) for text guidance, (-, -) for image guidance."""
    if cfg_text == 1.0 and cfg_image == 1.0:
        return ("full",)
    if cfg_image == 1.0:
        return ("full", "image")
    return ("full", "image", "none")


def guided_velocity(v: torch.Tensor, passes: tuple[GuidancePass, ...], cfg_text: float, cfg_image: float
                    ) -> torch.Tensor:
    """The guided velocity (float32) from `v`, the passes' velocities concatenated pass-major along dim 0."""
    parts = dict(zip(passes, v.float().chunk(len(passes))))
    if passes == ("full",):
        return parts["full"]
    if passes == ("full", "image"):
        return parts["image"] + cfg_text * (parts["full"] - parts["image"])
    if passes == ("full", "image", "none"):
        return (parts["none"] + cfg_image * (parts["image"] - parts["none"])
                + cfg_text * (parts["full"] - parts["image"]))
    raise ValueError(f"passes {passes} are not what guidance_passes returns")
