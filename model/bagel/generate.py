"""Sampling and the yes/no self-judge for a `BagelModel` (model.pipeline.BagelPipeline calls them).

Generation is an Euler ODE: the velocity (eps - x0) integrated from t = 1 (noise) to t = 0 over
`model.scheduler.sampling_timesteps(steps, timestep_shift)`, with the scheduler's three-condition guidance:

    v = v(-, -) + s_I [v(I, -) - v(-, -)] + s_T [v(I, T) - v(I, -)]

where, as family.packed_forward drops conditions in training, (I, -) keeps the references and replaces the
instruction by an empty framed text `<|im_start|><|im_end|>`, and (-, -) also removes the references (their VAE and
ViT tokens). The contexts are laid out by model.bagel.context, the function training uses: references before the
instruction, or, for an instruction with `<imagehere>` placeholders, each reference at its placeholder. Only the passes `guidance_passes` asks for run. With a bridge (model.bagel.bridge), only (I, T) gets
it: the semantic mask is built from the instruction, which the other passes do not have.

Each case's contexts (one per pass) are encoded once; every step then runs only the target tokens of every case
and pass of a chunk as continuations of those cached keys/values, in one packed forward. `use_cache=False` runs
context and target as one sequence every step instead (the check that the cache is exact).

Images: every image of a case (references and the generated target) is square, of side
`family.image_side(model.config, image_size)`, resized and normalised as training does (`family._pixels`).
`image_size` defaults to the largest side among the case's references, so a case's output does not depend on the
other cases; a case without references needs it. Noise is a function of (seed, index of the case in `examples`),
each case's references are encoded and its image decoded on their own: images do not depend on batching (bitwise
on CPU; only the packed step forward sees other cases, and other kernels may round it differently).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.bagel.context import add_generation_context, encode_instruction
from model.bagel.family import BagelTokenizer, _pixels, image_side
from model.bagel.model import BagelModel, Context
from model.bagel.packing import PackedSample
from model.batching import Example, to_uint8
from model.config import BridgeConfig
from model.scheduler import case_noise, guidance_passes, guided_velocity, sampling_timesteps


@dataclass
class _Case:
    index: int  # position in `examples`: the noise's key
    rows: int
    cols: int
    ref_pixels: list[torch.Tensor]  # (3, side, side) in [-1, 1]
    ref_tokens: list[torch.Tensor]  # clean latent tokens (rows * cols, p * p * z)
    text: list[list[int]]  # the instruction's pieces (model.bagel.context.encode_instruction)

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols


def _check_image(img, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 H x W x 3 image, got shape {img.shape} dtype {img.dtype}")
    return img


def _side(model: BagelModel, image_size: int | None, images: Sequence[np.ndarray], what: str) -> int:
    if image_size is None:
        if not images:
            raise ValueError(f"{what} has no reference image to take the image size from; pass image_size "
                             "(the project's model.image_size, as training's collate reads it)")
        image_size = max(max(im.shape[:2]) for im in images)
    return image_side(model.config, int(image_size))


def _prepare(model: BagelModel, tokenizer: BagelTokenizer, example: Example, index: int,
             image_size: int | None) -> _Case:
    refs = [_check_image(r, f"example {index} reference {j}") for j, r in enumerate(example.refs)]
    side = _side(model, image_size, refs, f"example {index}")
    rows, cols = model.latent_grid(side, side)
    device, dtype = model.vae2llm.weight.device, model.vae2llm.weight.dtype
    pixels = [_pixels(r, side).to(device) for r in refs]
    tokens = []
    if pixels:
        latents = model.ae_encode(torch.stack(pixels).to(dtype))
        tokens = [model.latent_to_tokens(z) for z in latents]
    text = encode_instruction(tokenizer.encode, example.instruction, len(refs), f"example {index}")
    return _Case(index, rows, cols, pixels, tokens, text)


def _context(model: BagelModel, case: _Case, which: str) -> PackedSample:
    """The pass's context as training lays it out (model.bagel.context: per reference clean VAE tokens then ViT
    tokens, before the framed instruction or at its placeholders), from latents encoded once per case rather than
    once per pass."""
    sample = PackedSample()
    n = 0 if which == "none" else len(case.ref_pixels)

    def add_reference(k: int) -> None:
        model.add_latent(sample, case.ref_tokens[k], case.rows, case.cols, timestep=0.0)
        model.add_reference(sample, case.ref_pixels[k], vae=False)

    add_generation_context(sample, model.frame_text, n, add_reference, case.text, drop_text=which != "full")
    return sample


def _velocities(model: BagelModel, samples: list[PackedSample], past: list[Context] | None,
                bridge: BridgeConfig | None) -> torch.Tensor:
    """The last latent image's velocity of every sample, concatenated in order, from one packed forward.

    Continuations take the bridge mask their contexts remember; whole sequences get `bridge`, which only masks
    the samples that have instruction words and references (the (I, T) pass)."""
    hidden = (model.hidden_states(samples, past=past) if past is not None
              else model.hidden_states(samples, bridge=bridge))[0]
    h = torch.cat([hk[s.vae_images[-1].index.to(hk.device)] for hk, s in zip(hidden, samples)])
    return model.llm2vae(h)


def _sample_chunk(model: BagelModel, cases: list[_Case], passes: tuple[str, ...], times: torch.Tensor, *,
                  cfg_text: float, cfg_image: float, seed: int, bridge: BridgeConfig | None,
                  use_cache: bool) -> list[torch.Tensor]:
    device = model.vae2llm.weight.device
    xs = [case_noise(seed, c.index, (c.n_tokens, model.config.patch_latent_dim)).to(device) for c in cases]
    # pass-major, as guided_velocity splits the velocities
    order = [(p, c) for p in passes for c in cases]
    contexts = None
    if use_cache:
        contexts = [model.encode_context(_context(model, c, p), bridge=bridge if p == "full" else None)
                    for p, c in order]
    sizes = [c.n_tokens for c in cases]
    for i in range(len(times) - 1):
        t = float(times[i])
        samples = []
        for k, (p, c) in enumerate(order):
            sample = contexts[k].sample.continuation() if use_cache else _context(model, c, p)
            model.add_latent(sample, xs[k % len(cases)], c.rows, c.cols, timestep=t)
            samples.append(sample)
        v = guided_velocity(_velocities(model, samples, contexts, bridge), passes, cfg_text, cfg_image)
        dt = float(times[i + 1] - times[i])
        xs = [x + dt * vk for x, vk in zip(xs, v.split(sizes))]
    return [x.float().cpu() for x in xs]


@torch.no_grad()
def _sample(model: BagelModel, tokenizer: BagelTokenizer, examples: Sequence[Example], *, steps: int,
            cfg_text: float, cfg_image: float, seed: int, bridge: BridgeConfig | None, batch_size: int,
            use_cache: bool, timestep_shift: float, image_size: int | None) -> tuple[list[_Case], list[torch.Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    passes = guidance_passes(cfg_text, cfg_image)
    times = sampling_timesteps(steps, timestep_shift)
    was_training = model.training
    model.eval()
    try:
        cases, out = [], []
        for start in range(0, len(examples), batch_size):
            chunk = [_prepare(model, tokenizer, e, start + i, image_size)
                     for i, e in enumerate(examples[start: start + batch_size])]
            out += _sample_chunk(model, chunk, passes, times, cfg_text=cfg_text, cfg_image=cfg_image, seed=seed,
                                 bridge=bridge, use_cache=use_cache)
            cases += chunk
        return cases, out
    finally:
        model.train(was_training)


def sample_latents(model: BagelModel, tokenizer: BagelTokenizer, examples: Sequence[Example], *, steps: int,
                   cfg_text: float, cfg_image: float, seed: int, bridge: BridgeConfig | None = None,
                   batch_size: int = 32, use_cache: bool = True, timestep_shift: float = 1.0,
                   image_size: int | None = None) -> list[torch.Tensor]:
    """Final latents (z, side / f, side / f) per example (float32, CPU), ready for `model.ae_decode`; example
    targets are ignored."""
    cases, tokens = _sample(model, tokenizer, examples, steps=steps, cfg_text=cfg_text, cfg_image=cfg_image,
                            seed=seed, bridge=bridge, batch_size=batch_size, use_cache=use_cache,
                            timestep_shift=timestep_shift, image_size=image_size)
    return [model.tokens_to_latent(x, c.rows, c.cols) for c, x in zip(cases, tokens)]


@torch.no_grad()
def generate(model: BagelModel, tokenizer: BagelTokenizer, examples: Sequence[Example], *, steps: int,
             cfg_text: float, cfg_image: float, seed: int, bridge: BridgeConfig | None = None,
             batch_size: int = 32, use_cache: bool = True, timestep_shift: float = 1.0,
             image_size: int | None = None) -> list[np.ndarray]:
    """One uint8 image (side x side x 3) per example; example targets are ignored."""
    latents = sample_latents(model, tokenizer, examples, steps=steps, cfg_text=cfg_text, cfg_image=cfg_image,
                             seed=seed, bridge=bridge, batch_size=batch_size, use_cache=use_cache,
                             timestep_shift=timestep_shift, image_size=image_size)
    device, dtype = model.vae2llm.weight.device, model.vae2llm.weight.dtype
    # one decode per image: a batched convolution may round differently, and images must not depend on batching
    return [to_uint8(model.ae_decode(z[None].to(device, dtype))[0]) for z in latents]


# ---------------------------------------------------------------------------------------------------------------
# the self-judge


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """Ids of the answers "yes" and "no" as training encodes them (`tok.encode(answer)`, then framed), so the
    judged token is the one the understanding loss teaches after `<|im_start|>`."""
    ids = {word: list(tokenizer.encode(word)) for word in ("yes", "no")}
    split = {word: i for word, i in ids.items() if len(i) != 1}
    if split:
        raise ValueError(f"the tokenizer encodes {split} as several tokens; the self-judge reads P(yes) off one "
                         "answer token, so 'yes' and 'no' must each be a single token (a tokenizer trained on the "
                         "chain's text has them)")
    return ids["yes"][0], ids["no"][0]


@torch.no_grad()
def yes_probability(model: BagelModel, tokenizer: BagelTokenizer, images: Sequence[np.ndarray],
                    questions: Sequence[str], *, batch_size: int = 64, image_size: int | None = None) -> np.ndarray:
    """P(yes) = softmax over the {yes, no} logits of the first answer token, one per (image, question) pair.

    Each image is resized to `family.image_side(model.config, image_size or its largest side)` as training does."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    yes, no = yes_no_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        device = model.vae2llm.weight.device
        out = []
        for s in range(0, len(images), batch_size):
            samples = []
            for i, (img, question) in enumerate(zip(images[s: s + batch_size], questions[s: s + batch_size])):
                img = _check_image(img, f"image {s + i}")
                pixels = _pixels(img, _side(model, image_size, [img], f"image {s + i}")).to(device)
                # BagelModel.answer_logits' query: <|im_start|> right after the framed question
                sample = model.understanding_context([pixels], tokenizer.encode(question))
                sample.add_text([model.special.bos])
                samples.append(sample)
            hidden = model.hidden_states(samples)[0]
            logits = model.language_model.lm_head(torch.stack([h[-1] for h in hidden]))
            out.append(torch.softmax(logits[:, [yes, no]].float(), dim=-1)[:, 0].cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
    finally:
        model.train(was_training)
