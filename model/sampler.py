"""Image generation: Euler integration of the learned velocity from t = 1 (noise) to t = 0, with guidance.

Classifier-free guidance follows InstructPix2Pix, with the references as the image condition I and the
instruction as the text condition T, from three passes: full (I, T), references only (I, -) and nothing (-, -):

    v = v(-, -) + s_I [v(I, -) - v(-, -)] + s_T [v(I, T) - v(I, -)]

s_I = s_T = 1 reduces to the full pass alone, s_I = 1 to two passes; only the needed passes run, as one batch.
Training drops conditions the same way (model.modeling.SconeModel.drop_conditions). With the bridge on, the
semantic mask is built from the instruction, so passes without text run without it.

The context (references + instruction, every pass) is encoded once per batch of cases; each step recomputes
the target tokens only (`use_cache=False` recomputes everything every step through the dense reference path).
Noise is a function of (seed, position of the case in `examples`), so images do not depend on batching.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.batching import Example, collate
from model.flow import sampling_timesteps
from model.latent import to_uint8


def guidance_passes(cfg_text: float, cfg_image: float) -> tuple[str, ...]:
    if cfg_text == 1.0 and cfg_image == 1.0:
        return ("full",)
    if cfg_image == 1.0:
        return ("full", "image")
    return ("full", "image", "none")


def _condition(batch: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    text_mask, ref_mask = batch["text_mask"].clone(), batch["ref_mask"].clone()
    if which in ("image", "none"):
        text_mask[:, 1:] = False  # [BOS] stays, as in training
    if which == "none":
        ref_mask[:] = False
    return {**batch, "text_mask": text_mask, "ref_mask": ref_mask}


def _guided(v: torch.Tensor, passes: tuple[str, ...], cfg_text: float, cfg_image: float) -> torch.Tensor:
    parts = dict(zip(passes, v.float().chunk(len(passes))))
    if passes == ("full",):
        return parts["full"]
    if passes == ("full", "image"):
        return parts["image"] + cfg_text * (parts["full"] - parts["image"])
    return parts["none"] + cfg_image * (parts["image"] - parts["none"]) + cfg_text * (parts["full"] - parts["image"])


def case_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state) & (2**63 - 1)))


@torch.no_grad()
def sample_latents(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    cfg_text: float,
    cfg_image: float,
    seed: int,
    bridge: bool,
    batch_size: int = 32,
    use_cache: bool = True,
) -> torch.Tensor:
    """Final target latents [N, Nl, C] (float32, CPU), before decoding; example targets are ignored."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        passes = guidance_passes(cfg_text, cfg_image)
        times = sampling_timesteps(steps, model.config.timestep_shift, device=device)
        n_lat, channels = model.latent_grid**2, model.latent.channels
        out: list[torch.Tensor] = []
        for start in range(0, len(examples), batch_size):
            chunk = [Example(refs=e.refs, instruction=e.instruction) for e in examples[start : start + batch_size]]
            cond = {k: v.to(device) for k, v in collate(chunk, tokenizer, model.config).items()}
            parts = [_condition(cond, p) for p in passes]
            batch = {k: torch.cat([p[k] for p in parts]) for k in cond}
            x = torch.stack([case_noise(seed, start + i, (n_lat, channels)) for i in range(len(chunk))]).to(device)
            context = model.encode_context(batch, bridge=bridge) if use_cache else None
            for i in range(steps):
                t = times[i].expand(x.shape[0] * len(passes))
                x_in = x.repeat(len(passes), 1, 1)
                if context is not None:
                    v = model.velocity_from_context(context, x_in, t)
                else:
                    v = model.predict_velocity_dense(batch, x_in, t, bridge=bridge)
                x = x + (times[i + 1] - times[i]) * _guided(v, passes, cfg_text, cfg_image)
            out.append(x.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, n_lat, channels)
    finally:
        model.train(was_training)


def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    cfg_text: float,
    cfg_image: float,
    seed: int,
    bridge: bool,
    batch_size: int = 32,
    use_cache: bool = True,
) -> list[np.ndarray]:
    """One uint8 image (S x S x 3) per example; example targets are ignored."""
    if not examples:
        return []
    latents = sample_latents(
        model, tokenizer, examples, steps=steps, cfg_text=cfg_text, cfg_image=cfg_image, seed=seed, bridge=bridge,
        batch_size=batch_size, use_cache=use_cache,
    )
    return list(to_uint8(model.decode_latents(latents)))
