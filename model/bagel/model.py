"""The unified BAGEL / Scone model: MoT language model, SigLIP + connector, FLUX autoencoder, and the small
modules that turn latents and timesteps into language-model tokens.

The methods are the ones training, sampling and a self-judge call:
- `hidden_states(samples)`: packed forward over any layouts (training: several samples, one call);
- `encode_context` + `velocity_from_context`: the sampler encodes references and instruction once and reuses the
  context's keys/values at every denoising step (exact: the context never attends to the target);
- `velocity`: the same in one uncached call;
- Scone's understanding bridge (model.bagel.bridge): pass a BridgeConfig to `hidden_states`, `encode_context` or
  `velocity`; off by default, as the released sampler. A context encoded with it remembers its mask, which
  `velocity_from_context` then applies to the target, equal to the uncached `velocity(..., bridge=...)`;
- `bridge_relevance`: the bridge's relevance s of every reference token (diagnostics, choosing tau);
- `answer_logits`: next-token logits after a question about images (the `self` judge);
- `ae_encode` / `ae_decode` and `latent_to_tokens` / `tokens_to_latent`.
Images are tensors (3, H, W) normalised as (pixel / 255 - 0.5) / 0.5; their sides must be multiples of the ViT
patch and of the latent token size (BAGEL's resize rules are the data pipeline's business, not the model's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model.bagel.autoencoder import FluxAutoencoder
from model.bagel.bridge import BridgeHook
from model.bagel.config import BagelConfig
from model.bagel.context import add_generation_context
from model.bagel.packing import PackedSample, SpecialTokens
from model.bagel.qwen2_mot import LayerKV, Qwen2MoTForCausalLM
from model.bagel.siglip import MLPConnector, PositionEmbedding, SiglipVisionModel, patchify, unpatchify
from model.config import BridgeConfig

# Top-level modules whose weights live in the autoencoder's own file (`ae.safetensors`) in a release.
AE_PREFIX = "ae."


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding of t in [0, 1] as given (BAGEL does not scale it by 1000)."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


@dataclass
class Context:
    """A sample's encoded context: per-layer keys/values and where its continuation starts."""

    sample: PackedSample
    kv: list[LayerKV]  # one per layer
    # the understanding bridge it was encoded with: 0 / -inf (float32) per key of the context (prefix included),
    # added to the continuation's latent queries in layers bridge_layers[0]..bridge_layers[1]; None: no mask
    bridge_bias: torch.Tensor | None = None
    bridge_layers: tuple[int, int] | None = None


class BagelModel(nn.Module):
    def __init__(self, cfg: BagelConfig, special: SpecialTokens | None = None):
        super().__init__()
        self.config = cfg
        self.special = special or SpecialTokens.last_of_vocab(cfg.llm.vocab_size)
        hidden = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = MLPConnector(cfg.vit.hidden_size, hidden, cfg.connector_act)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)
        self.ae = FluxAutoencoder(cfg.vae)

    # ---- initialisation (a fresh model; a release brings its own weights) ----

    def reset_non_persistent(self, device=None) -> None:
        """Buffers that are not in any weights file, recomputed after `to_empty`."""
        self.language_model.model.rotary_emb.reset_buffers(device or self.vae2llm.weight.device)

    def init_fresh(self, zero_velocity_head: bool = True) -> None:
        """Complete PyTorch's default initialisation into BAGEL's: sin-cos tables filled, velocity head zero."""
        self.vit_pos_embed.reset_table()
        self.latent_pos_embed.reset_table()
        if zero_velocity_head:
            # BAGEL starts the velocity head at zero so a new generation expert begins from a constant prediction.
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)

    # ---- latents ----

    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> scaled latents (b, z, H/8, W/8)."""
        return self.ae.encode(images)

    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(latents)

    def latent_to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """(z, h, w) -> (h/p * w/p, p * p * z), the generation expert's token layout."""
        return patchify(latent, self.config.latent_patch_size)

    def tokens_to_latent(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        p = self.config.latent_patch_size
        return unpatchify(tokens, p, self.config.vae.z_channels, rows, cols)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent token rows x cols of an image of height x width pixels."""
        step = self.config.latent_downsample
        if height % step or width % step:
            raise ValueError(f"image {height}x{width} is not a multiple of {step} pixels")
        return height // step, width // step

    # ---- layouts ----

    def frame_text(self, ids) -> list[int]:
        return [self.special.bos, *[int(i) for i in ids], self.special.eos]

    def add_reference(self, sample: PackedSample, image: torch.Tensor, vae: bool = True, vit: bool = True) -> None:
        """A reference image as the generation context wants it: its clean VAE tokens, then its ViT tokens."""
        if vae:
            rows, cols = self.latent_grid(image.shape[1], image.shape[2])
            latent = self.ae_encode(image[None].to(self.vae2llm.weight.dtype))[0]
            self.add_latent(sample, self.latent_to_tokens(latent), rows, cols, timestep=0.0)
        if vit:
            sample.add_vit_image(image.to(self.vae2llm.weight.dtype), self.config.vit.patch_size,
                                 self.config.vit_max_num_patch_per_side, self.special)

    def add_latent(self, sample: PackedSample, tokens: torch.Tensor, rows: int, cols: int, timestep: float):
        return sample.add_vae_image(tokens, rows, cols, timestep, self.config.max_latent_size, self.special)

    def generation_context(self, references: list[torch.Tensor], instruction_ids, pieces=None) -> PackedSample:
        """model.bagel.context's layout: the references then the framed instruction (`instruction_ids`), or with
        `pieces` (an interleaved instruction's pieces, model.bagel.context.encode_instruction) each reference at
        its placeholder."""
        sample = PackedSample()
        add_generation_context(sample, self.frame_text, len(references),
                               lambda k: self.add_reference(sample, references[k]), pieces or [instruction_ids])
        return sample

    def understanding_context(self, images: list[torch.Tensor], question_ids) -> PackedSample:
        sample = PackedSample()
        for image in images:
            self.add_reference(sample, image, vae=False)
        sample.add_text(self.frame_text(question_ids))
        return sample

    # ---- forward ----

    def embed(self, sample: PackedSample) -> torch.Tensor:
        """Input embeddings (len, hidden) of one sample."""
        dtype = self.vae2llm.weight.dtype
        device = self.vae2llm.weight.device
        x = torch.zeros(len(sample), self.config.llm.hidden_size, dtype=dtype, device=device)
        if sample.text_ids:
            ids = torch.tensor(sample.text_ids, device=device)
            x[torch.tensor(sample.text_index, device=device)] = self.language_model.model.embed_tokens(ids)
        if sample.vit_images:
            imgs = sample.vit_images
            pos = torch.cat([im.position_ids for im in imgs]).to(device)
            feats = self.vit_model(torch.cat([im.patches for im in imgs]).to(device, dtype), pos,
                                   [im.patches.shape[0] for im in imgs])
            x[torch.cat([im.index for im in imgs]).to(device)] = self.connector(feats) + self.vit_pos_embed(pos)
        if sample.vae_images:
            imgs = sample.vae_images
            pos = torch.cat([im.position_ids for im in imgs]).to(device)
            t = torch.cat([torch.full((im.tokens.shape[0],), im.timestep) for im in imgs]).to(device)
            tokens = torch.cat([im.tokens for im in imgs]).to(device, dtype)
            x[torch.cat([im.index for im in imgs]).to(device)] = (
                self.vae2llm(tokens) + self.time_embedder(t) + self.latent_pos_embed(pos))
        return x

    def hidden_states(self, samples: list[PackedSample], past: list[Context] | None = None,
                      keep: bool = False, bridge: BridgeConfig | None = None
                      ) -> tuple[list[torch.Tensor], list[Context] | None]:
        """Final hidden states of each sample, all packed into one forward.

        past[i] is sample i's cached prefix (then sample i must be its `continuation()`); keep=True also returns
        each sample's context (prefix + its own tokens) for later continuations.
        bridge: compute and apply the understanding bridge in every sample that has references and instruction
        words (others run as without it). With `past`, each context's remembered mask applies instead, so
        `bridge` must be None there.
        """
        hook = self._bridge_hook(samples, past, bridge)
        device = self.vae2llm.weight.device
        if past is not None:
            for s, ctx in zip(samples, past, strict=True):
                if s.prefix_len != ctx.sample.prefix_len + len(ctx.sample):
                    raise ValueError("sample does not continue the given context")
        x = torch.cat([self.embed(s) for s in samples])
        gen_mask = torch.cat([s.gen_mask() for s in samples]).to(device)
        positions = torch.tensor([p for s in samples for p in s.position_ids], device=device)
        masks = [s.attention_mask(device) for s in samples]
        lens = [len(s) for s in samples]
        layer_past = None
        if past is not None:
            layer_past = [[ctx.kv[n] for ctx in past] for n in range(self.config.llm.num_hidden_layers)]
        h, kept = self.language_model(x, gen_mask, positions, masks, lens, layer_past, keep, hook)
        contexts = None
        if keep:
            contexts = [Context(s, [kept[n][i] for n in range(len(kept))],
                                *(hook.context_mask(i) if hook is not None else (None, None)))
                        for i, s in enumerate(samples)]
        return list(h.split(lens)), contexts

    def _bridge_hook(self, samples: list[PackedSample], past: list[Context] | None,
                     bridge: BridgeConfig | None) -> BridgeHook | None:
        if past is not None:
            if bridge is not None:
                raise ValueError("a continuation takes the bridge mask its context was encoded with: pass bridge "
                                 "to encode_context, not together with past")
            if any(ctx.bridge_bias is not None for ctx in past):
                return BridgeHook.from_contexts(samples, past)
            return None
        if bridge is None:
            return None
        return BridgeHook.from_config(bridge, samples, self.special, self.config.llm.num_hidden_layers)

    def encode_context(self, sample: PackedSample, bridge: BridgeConfig | None = None) -> Context:
        """With `bridge`, the context also remembers its semantic mask for `velocity_from_context`."""
        return self.hidden_states([sample], keep=True, bridge=bridge)[1][0]

    @torch.no_grad()
    def bridge_relevance(self, sample: PackedSample, bridge: BridgeConfig) -> list[torch.Tensor] | None:
        """The bridge's relevance s (float32, per reference, over its ViT grid row-major) in `sample`; None when
        the sample has no references or no instruction words."""
        hook = BridgeHook.from_config(bridge, [sample], self.special, self.config.llm.num_hidden_layers)
        x = self.embed(sample)
        device = x.device
        self.language_model(x, sample.gen_mask().to(device), torch.tensor(sample.position_ids, device=device),
                            [sample.attention_mask(device)], [len(sample)], None, False, hook)
        return hook.relevance[0]

    def _target(self, after: PackedSample, x_t: torch.Tensor, t: float, rows: int, cols: int) -> PackedSample:
        target = after.continuation()
        self.add_latent(target, x_t, rows, cols, timestep=t)
        return target

    def velocity_from_context(self, context: Context, x_t: torch.Tensor, t: float,
                              size: tuple[int, int]) -> torch.Tensor:
        """Velocity (eps - x0) for target tokens x_t (rows*cols, p*p*z) of an image of size (H, W) at time t.

        The context's bridge mask, if it was encoded with one, applies to the target's latent queries."""
        rows, cols = self.latent_grid(*size)
        target = self._target(context.sample, x_t, t, rows, cols)
        h = self.hidden_states([target], past=[context])[0][0]
        return self.llm2vae(h[target.vae_images[0].index.to(h.device)])

    def velocity(self, x_t: torch.Tensor, t: float, size: tuple[int, int], references: list[torch.Tensor],
                 instruction_ids, bridge: BridgeConfig | None = None) -> torch.Tensor:
        """Uncached: context and target in one sequence."""
        rows, cols = self.latent_grid(*size)
        sample = self.generation_context(references, instruction_ids)
        self.add_latent(sample, x_t, rows, cols, timestep=t)
        h = self.hidden_states([sample], bridge=bridge)[0][0]
        return self.llm2vae(h[sample.vae_images[-1].index.to(h.device)])

    def answer_logits(self, images: list[torch.Tensor], question_ids) -> torch.Tensor:
        """Logits (vocab,) of the first answer token: the query is `<|im_start|>` right after the question."""
        sample = self.understanding_context(images, question_ids)
        sample.add_text([self.special.bos])
        h = self.hidden_states([sample])[0][0]
        return self.language_model.lm_head(h[-1])
